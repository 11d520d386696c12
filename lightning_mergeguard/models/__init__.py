"""The model helpers the library itself uses, below the callbacks and post-hoc protection.

- :mod:`.open_clip`: open_clip models built offline (tiny configs, named ones, local checkpoints), their image
  preprocessing, and an image classifier module (the ``vision`` extra).
- :mod:`.classifier`: the minimal classification LightningModule that classifier builds on.
- :mod:`.trainer`: the quiet one-device Trainer (post hoc's re-fit, the demos, benchmarks and tests).

Hugging Face causal LMs are handled in :mod:`lightning_mergeguard.models.causal_lm`. Nothing here imports
:mod:`lightning_mergeguard.demos`, which builds on this package.
"""
