"""Deprecated: moved to :mod:`lightning_mergeguard.demos.vision_tasks`."""

import warnings

from lightning_mergeguard.demos.vision_tasks import *  # noqa: F403
from lightning_mergeguard.demos.vision_tasks import __all__  # noqa: F401

warnings.warn(
    "lightning_mergeguard.vision_tasks moved to lightning_mergeguard.demos.vision_tasks",
    DeprecationWarning,
    stacklevel=2,
)
