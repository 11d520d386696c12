"""Deprecated: moved to :mod:`lightning_mergeguard.demos.open_clip`."""

import warnings

from lightning_mergeguard.demos.open_clip import *  # noqa: F403
from lightning_mergeguard.demos.open_clip import __all__  # noqa: F401

warnings.warn(
    "lightning_mergeguard.vision moved to lightning_mergeguard.demos.open_clip", DeprecationWarning, stacklevel=2
)
