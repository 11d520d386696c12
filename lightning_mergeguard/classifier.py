"""Deprecated: moved to :mod:`lightning_mergeguard.demos.classifier`."""

import warnings

from lightning_mergeguard.demos.classifier import *  # noqa: F403
from lightning_mergeguard.demos.classifier import __all__  # noqa: F401

warnings.warn(
    "lightning_mergeguard.classifier moved to lightning_mergeguard.demos.classifier", DeprecationWarning, stacklevel=2
)
