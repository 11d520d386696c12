"""The errors this library raises for bad input, each naming the model, file, tensor or key at fault.

Every class derives from :class:`MergeGuardError` (catch that for "anything the user can fix") and from the builtin
type older code caught (``ValueError`` or ``OSError``), so ``except ValueError`` keeps working.

Example:
    >>> from lightning_mergeguard.errors import ConfigError, MergeGuardError
    >>> issubclass(ConfigError, MergeGuardError) and issubclass(ConfigError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ForeignBaseError",
    "IncompatibleModelsError",
    "MergeGuardError",
    "NonFiniteError",
    "OutputError",
    "WeightsFileError",
]


class MergeGuardError(Exception):
    """Base class: an input or environment problem the user can fix (the CLI prints it in one line)."""


class ConfigError(MergeGuardError, ValueError):
    """A merge config (YAML or mapping) that is malformed, misspelled or too large."""


class WeightsFileError(MergeGuardError, ValueError):
    """A weights or config file that cannot be read: corrupt, unsupported dtype, malformed index. Names the file."""


class IncompatibleModelsError(MergeGuardError, ValueError):
    """Models that do not fit together: missing or extra tensors, other shapes, another architecture."""


class ForeignBaseError(IncompatibleModelsError):
    """A donor whose weights are too far from the base to be a fine-tune of it (another base model)."""


class NonFiniteError(MergeGuardError, ValueError):
    """A tensor with NaN or Inf values, in an input or in a merge's output."""


class OutputError(MergeGuardError, OSError):
    """The output cannot be written: read-only or full disk, a path of the wrong kind, an existing model."""
