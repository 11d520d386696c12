"""What happens to the model being released after stage 2.

- :mod:`~lightning_mergeguard.protection.release.symmetry`: exact symmetries of transformer blocks (``amplify``);
- :mod:`~lightning_mergeguard.protection.release.residual`: the permutation of the residual stream;
- :mod:`~lightning_mergeguard.protection.release.amplify`: both applied after stage 2, checked on the live model;
- :mod:`~lightning_mergeguard.protection.release.deployment`: the release under what its users do to it (fp16,
  quantization, further fine-tuning).
"""

from lightning_mergeguard.protection.release.settings import Release

__all__ = ["Release"]
