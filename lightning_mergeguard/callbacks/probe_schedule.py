"""When :class:`~lightning_mergeguard.MergeProbe` probes: :class:`ProbeSchedule`."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_mergeguard.validation import check_int, is_number

__all__ = ["DEFAULT_MAX_OVERHEAD", "ProbeSchedule"]

DEFAULT_MAX_OVERHEAD = 0.05
"""The default probing budget, a fraction of the training time.

Measured by ``benchmarks/probe_overhead.py`` (SmolLM2-135M, 2 CPU cores, ``benchmarks/results/probe_overhead.json``):
probing every epoch cost 1.15x the wall time of plain fine-tuning (17 s per probe), and probing every 10 steps under
a 0.05 budget 1.04x (2 probes run, 19 skipped). The budget keeps any cadence affordable without tuning: the first
scheduled probe runs, later ones whenever probing so far took at most this share of the time, and the probe at the
end of fit always runs."""


@dataclass(frozen=True)
class ProbeSchedule:
    """When a probe runs: a step or epoch cadence, a time budget, and once more at the end of fit.

    Args:
        every_n_steps: Probe every this many optimizer steps (``None``: no step cadence).
        every_n_epochs: Probe at the end of every this many training epochs (``None``: no epoch cadence). With
            neither cadence set, every epoch.
        on_train_end: Probe once more when training ends (after stage 2 of a guard, in any order of callbacks). It
            always runs, whatever the budget.
        max_overhead: A scheduled probe is skipped while the time spent probing would exceed this fraction of the
            training time so far (:data:`DEFAULT_MAX_OVERHEAD`; the decision is rank zero's, broadcast to all
            ranks). ``None``: every scheduled probe runs.

    Example:
        >>> ProbeSchedule(every_n_steps=100).every_n_epochs is None
        True
        >>> ProbeSchedule().every_n_epochs
        1
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    on_train_end: bool = True
    max_overhead: float | None = DEFAULT_MAX_OVERHEAD

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "every_n_epochs"):
            check_int(getattr(self, name), name, low=1, want="a positive integer or None", optional=True)
        if self.every_n_steps is None and self.every_n_epochs is None:
            object.__setattr__(self, "every_n_epochs", 1)
        if not isinstance(self.on_train_end, bool):
            raise ValueError(f"on_train_end must be True or False, got {self.on_train_end!r}")
        if self.max_overhead is not None and not (is_number(self.max_overhead) and self.max_overhead > 0):
            raise ValueError(f"max_overhead must be a positive fraction or None, got {self.max_overhead!r}")
