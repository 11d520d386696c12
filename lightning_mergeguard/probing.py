"""Pure pieces of the merge probe: donor task vectors as lazy weight sources, probe grids, result metrics."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_mergeguard.merging.config import MergeConfig
from lightning_mergeguard.merging.sources import WeightSource

__all__ = [
    "ProbeSpec",
    "TaskVectorSource",
    "build_probe_specs",
    "merge_metrics",
    "named_signals",
]

LIVE = "live"
BASE = "base"
_TRIM_DEFAULT_DENSITY = {
    "ties": 0.5,
    "dare_linear": 0.5,
    "dare_ties": 0.5,
    "breadcrumbs": 0.9,
    "breadcrumbs_ties": 0.9,
    "della": 0.5,
    "della_linear": 0.5,
}


class TaskVectorSource(WeightSource):
    """Weights ``base + tau`` produced one tensor at a time, on ``device``.

    The stored task vector (and base) may be bf16 and live on the CPU (pinned): each tensor is copied to ``device``
    with ``non_blocking=True`` and added there in at least float32, so no operation ever mixes devices.
    """

    def __init__(
        self,
        base: Mapping[str, Tensor],
        tau: Mapping[str, Tensor],
        name: str,
        device: torch.device | str | None = None,
    ) -> None:
        self._base, self._tau, self.name = base, tau, name
        self._device = torch.device(device) if device is not None else None

    @override
    def keys(self) -> list[str]:
        return list(self._tau)

    @override
    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._base[key]
        return tuple(t.shape), t.dtype

    @override
    def get(self, key: str) -> Tensor:
        b, tau = self._base[key], self._tau[key]
        device = self._device or b.device
        dtype = torch.promote_types(torch.promote_types(b.dtype, tau.dtype), torch.float32)  # never add in bf16
        return b.to(device, dtype, non_blocking=True) + tau.to(device, dtype, non_blocking=True)


@dataclass(frozen=True)
class ProbeSpec:
    """One simulated merge: a label for the logs and the config to run (models named ``live`` and donors)."""

    label: str
    config: MergeConfig


_PAIRWISE = ("slerp", "nuslerp", "nearswap", "arcee_fusion")
"""Methods that merge exactly two models: with several donors the probe merges the live model with each."""
_INTO_DONOR = ("nearswap", "arcee_fusion")
"""Methods that take one model's changes into another: the probe takes the live model's into each donor's weights,
as a free-rider importing the owner's skill into their own model would."""


def _spec_from_mapping(method: Mapping[str, Any], donors: Sequence[str], coefficient: float | None) -> ProbeSpec:
    data = dict(method)
    name = data.pop("merge_method", None)
    if name is None:
        raise ValueError(f"probe method {method!r} has no 'merge_method'")
    label = data.pop("label", None)
    shared = dict(data.pop("parameters", {}) or {})
    per_model = dict(data.pop("model_parameters", {}) or {})
    if data:
        raise ValueError(f"probe method {name!r}: unknown keys {sorted(data)} (use parameters / model_parameters)")
    from lightning_mergeguard.merging.registry import get_method

    spec = get_method(name)
    models = [LIVE, *donors]
    if spec.name in ("linear", "multislerp"):  # the live model at weight c, the donors sharing the rest
        c = 1.0 / len(models) if coefficient is None else coefficient
        rest = (1.0 - c) / max(1, len(donors))
        entries = [{"model": LIVE, "parameters": {**per_model, "weight": c}}] + [
            {"model": d, "parameters": {**per_model, "weight": rest}} for d in donors
        ]
        label = label or (f"{spec.name}@{c:g}" if coefficient is not None else spec.name)
        cfg = {"merge_method": spec.name, "models": entries, "parameters": shared}
        if spec.name == "multislerp":
            cfg["base_model"] = BASE  # the sphere around theta_pre: the task vectors are interpolated
    elif spec.name == "slerp":
        t = shared.get("t", 0.5) if coefficient is None else coefficient
        cfg = {
            "merge_method": "slerp",
            "base_model": LIVE,
            "models": [{"model": LIVE}, {"model": donors[0]}],
            "parameters": {**shared, "t": t},
        }
        label = label or f"slerp@{t:g}"
    elif spec.name == "nuslerp":
        c = 0.5 if coefficient is None else coefficient
        entries = [{"model": LIVE, "parameters": {"weight": c}}, {"model": donors[0], "parameters": {"weight": 1 - c}}]
        cfg = {"merge_method": "nuslerp", "base_model": BASE, "models": entries, "parameters": shared}
        label = label or f"nuslerp@{c:g}"
    elif spec.name in _INTO_DONOR:
        if per_model:
            raise ValueError(f"probe method {name!r} takes no model parameters, got {sorted(per_model)}")
        cfg = {"merge_method": spec.name, "base_model": donors[0], "models": [{"model": LIVE}], "parameters": shared}
        label = label or spec.name
    elif not _takes_coefficient(spec):  # model_stock, sce, karcher, ram: the models are not weighted
        if per_model:
            raise ValueError(f"probe method {name!r} takes no model parameters, got {sorted(per_model)}")
        label = label or spec.name
        cfg = {"merge_method": spec.name, "base_model": BASE, "models": [{"model": m} for m in models]}
        cfg["parameters"] = shared
    else:
        params = {"weight": 1.0, **per_model}
        if "density" in spec.model_params and "density" not in params and spec.name in _TRIM_DEFAULT_DENSITY:
            params["density"] = _TRIM_DEFAULT_DENSITY[spec.name]
        if coefficient is not None:
            shared = {**shared, "lambda": coefficient}
        lam = shared.get("lambda", 1.0)
        label = label or f"{spec.name}@{lam:g}"
        cfg = {
            "merge_method": spec.name,
            "base_model": BASE,
            "models": [{"model": m, "parameters": dict(params)} for m in models],
            "parameters": shared,
        }
    # In float32, whatever dtype the reference is kept in (reference_dtype="bfloat16"): the merged weights are
    # written into the live parameters, not saved.
    cfg.setdefault("dtype", "float32")
    return ProbeSpec(label=label, config=MergeConfig.from_dict(cfg))


def _takes_coefficient(spec: Any) -> bool:
    return spec.name in ("linear", "slerp", "nuslerp", "multislerp") or "lambda" in spec.all_shared_params


def build_probe_specs(
    methods: Sequence[str | Mapping[str, Any] | os.PathLike[str]],
    donors: Sequence[str],
    coefficients: Sequence[float] | None,
) -> list[ProbeSpec]:
    """Expand methods x coefficients into probe specs.

    A method is a name (``"ties"``, mergekit defaults, ``weight: 1`` per model and a density of 0.5 for trimming
    methods), a mapping ``{merge_method, parameters, model_parameters, label}``, or a path to a mergekit YAML whose
    ``models`` name the donors and ``live`` (used as is, without the coefficient grid). The coefficient is
    ``lambda`` for task-vector methods, the live model's weight for ``linear``, ``multislerp`` and ``nuslerp``
    and ``t`` for ``slerp``; methods that weight nothing (``model_stock``, ``sce``, ``karcher``, ``ram``) run once.
    ``slerp`` and ``nuslerp`` merge two models: with several donors, the live model with each (labels
    ``slerp:<donor>@t``). ``nearswap`` (give its ``t``) and ``arcee_fusion`` take the live model's changes into
    each donor, as a free-rider importing the owner's skill into their own model would (``arcee_fusion:<donor>``).

    Example:
        >>> [s.label for s in build_probe_specs(["task_arithmetic", "ties"], ["d1"], [0.3, 0.5])]
        ['task_arithmetic@0.3', 'task_arithmetic@0.5', 'ties@0.3', 'ties@0.5']
    """
    from lightning_mergeguard.merging.registry import get_method

    if not donors:
        raise ValueError("the probe needs at least one donor")
    out: list[ProbeSpec] = []
    for method in methods:
        if isinstance(method, os.PathLike) or (isinstance(method, str) and method.endswith((".yml", ".yaml"))):
            cfg = MergeConfig.from_yaml(method)
            if cfg.slices is not None:
                raise ValueError(
                    f"probe config {method}: the probe merges whole models into the live model, and 'slices' may cut "
                    "or restack its layers; list the models under 'models' (a slice over all layers of every model "
                    "is the same merge)"
                )
            names = {m.model for m in cfg.models} | ({cfg.base_model} if cfg.base_model else set())
            unknown = names - {LIVE, BASE, *donors}
            if unknown:
                raise ValueError(
                    f"probe config {method}: models {sorted(unknown)} are neither 'live', 'base' nor donors"
                )
            out.append(ProbeSpec(label=os.path.splitext(os.path.basename(str(method)))[0], config=cfg))
            continue
        m = {"merge_method": method} if isinstance(method, str) else method
        takes = "merge_method" not in m or _takes_coefficient(get_method(m["merge_method"]))
        pairwise = "merge_method" in m and get_method(m["merge_method"]).name in _PAIRWISE and len(donors) > 1
        for c in (coefficients or [None]) if takes else [None]:
            if not pairwise:
                out.append(_spec_from_mapping(m, donors, c))
                continue
            for d in donors:  # SLERP-like methods merge two models: the live one with each donor in turn
                spec = _spec_from_mapping(m, [d], c)
                name, _, at = spec.label.partition("@")
                out.append(ProbeSpec(label=f"{name}:{d}" + (f"@{at}" if at else ""), config=spec.config))
    labels = [s.label for s in out]
    dupes = {x for x in labels if labels.count(x) > 1}
    if dupes:
        raise ValueError(f"probe labels must be unique; repeated: {sorted(dupes)} (set 'label' on the methods)")
    return out


def merge_metrics(label: str, merged: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """Metric names and values for one merge: accuracy, normalized accuracy and interference per task.

    Example:
        >>> m = merge_metrics("ta@0.3", {"own": 40.0}, {"own": 80.0})
        >>> m["mergeprobe/ta@0.3/own/normalized_acc"], m["mergeprobe/ta@0.3/own/interference"]
        (0.5, 40.0)
    """
    out = {}
    for task, acc in merged.items():
        ind = individual.get(task)
        out[f"mergeprobe/{label}/{task}/acc"] = acc
        if ind is not None:
            out[f"mergeprobe/{label}/{task}/normalized_acc"] = acc / ind if ind > 0 else math.nan
            out[f"mergeprobe/{label}/{task}/interference"] = ind - acc
    return out


def named_signals(signals: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """``{name: signal}`` from a mapping or from objects with a ``name`` (e.g. FingerprintSignal)."""
    if isinstance(signals, Mapping):
        named = dict(signals)
    else:
        named = {}
        for sig in signals:
            name = getattr(sig, "name", None)
            if not isinstance(name, str):
                raise TypeError(f"signal {sig!r} has no 'name'; pass a mapping {{name: signal}}")
            if name in named:
                raise ValueError(f"two signals are named {name!r}")
            named[name] = sig
    for name, sig in named.items():
        if not callable(sig):
            raise TypeError(f"signal {name!r} is not callable: it must map the module to a rate in [0, 1]")
        if "/" in name or not name:
            raise ValueError(f"signal name {name!r} must be non-empty and contain no '/'")
    return named
