"""Deprecated: moved to :mod:`lightning_mergeguard.demos.digits`."""

import warnings

from lightning_mergeguard.demos.digits import *  # noqa: F403
from lightning_mergeguard.demos.digits import __all__  # noqa: F401

warnings.warn("lightning_mergeguard.toy moved to lightning_mergeguard.demos.digits", DeprecationWarning, stacklevel=2)
