"""What every command of this package shares: switches, option spellings, YAML configs, signals and errors.

Nothing here imports torch, so ``--help`` and argument errors answer at once.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_switch(p, "permute-residual", False, "permute the stream")
    >>> add_switch(p, "progress", True, "progress bars")
    >>> vars(p.parse_args(hyphenated(["--permute_residual", "--no-progress"])))
    {'permute_residual': True, 'progress': False}
    >>> vars(p.parse_args(["--permute-residual", "false", "--progress", "true"]))
    {'permute_residual': False, 'progress': True}
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_mergeguard.errors import ConfigError, MergeGuardError, report_error

__all__ = ["Terminated", "add_switch", "hyphenated", "load_config", "run", "to_bool"]

_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def to_bool(value: str | bool) -> bool:
    """``true/yes/1/on`` or ``false/no/0/off`` (any case) as a bool; an argparse type.

    Example:
        >>> to_bool("Yes"), to_bool("off")
        (True, False)
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_switch(parser: argparse.ArgumentParser | Any, name: str, default: bool, help: str) -> None:
    """``--NAME`` (on), ``--no-NAME`` (off) and ``--NAME true|false``, with ``default``."""
    dest = name.replace("-", "_")
    parser.add_argument(
        f"--{name}", dest=dest, nargs="?", const=True, default=default, type=to_bool, metavar="BOOL",
        help=f"{help} (default: {'on' if default else 'off'})",
    )  # fmt: skip
    parser.add_argument(f"--no-{name}", dest=dest, action="store_false", help=f"turn --{name} off")


def hyphenated(argv: Sequence[str]) -> list[str]:
    """The command line with ``--some_option`` spelled ``--some-option`` (both spellings are accepted)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.partition("=")[0]:
            flag, eq, value = arg.partition("=")
            arg = flag.replace("_", "-") + eq + value
        out.append(arg)
    return out


def load_config(path: str, known: Sequence[str]) -> dict[str, Any]:
    """A YAML mapping of options (``some_option`` or ``some-option``), checked against the ``known`` ones.

    Raises:
        ConfigError: A file that cannot be read, is not a mapping, or names an option that does not exist.
    """
    import yaml

    try:
        if Path(path).stat().st_size > 1 << 20:
            raise ConfigError(f"--config {path}: more than 1 MiB; an options file is a few lines")
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: not a readable YAML file: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, got {type(data).__name__}")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in out if k not in known)
    if unknown:
        import difflib

        hints = [difflib.get_close_matches(k, known, n=1) for k in unknown]
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints))
        raise ConfigError(f"--config {path}: unknown option(s) {said}")
    return out


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every writer removes what it had half-written."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def run(prog: str, body: Callable[[], int], *, interrupted: str = "nothing was written") -> int:
    """Run a command's ``body`` with signals and expected errors handled; return its exit status.

    Ctrl-C (exit 130) and SIGTERM (exit 143) are answered with one line from wherever they arrive, start-up
    included; a :class:`~lightning_mergeguard.errors.MergeGuardError`, ``ValueError`` or ``OSError`` is printed as
    one line (exit 2). Anything else is a bug, and keeps its traceback.
    """
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated; {interrupted}", file=sys.stderr)
        return 143
    except (MergeGuardError, ValueError, NotImplementedError, OSError, ImportError, RuntimeError) as err:
        return report_error(prog, err)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
