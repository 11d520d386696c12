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
    "one_line",
    "report_error",
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


def one_line(err: BaseException) -> str:
    """A command-line message for ``err``: its text, or for an OS error its errno text and file name.

    Example:
        >>> one_line(FileNotFoundError(2, "No such file or directory", "a.csv"))
        'No such file or directory: a.csv'
    """
    if isinstance(err, OSError) and not isinstance(err, MergeGuardError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    elif isinstance(err, (MergeGuardError, ValueError, NotImplementedError, ImportError)):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())  # one line, whatever a library put in its message


def report_error(prog: str, err: BaseException) -> int:
    """Print ``prog: error: <one line>`` to stderr and return the exit status 2 (argparse's for bad input)."""
    import sys

    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return 2
