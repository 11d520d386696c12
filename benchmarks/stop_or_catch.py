"""Stop or catch: does every merge of the protected model either collapse or carry the owner's key?

Vision track (the open_clip ViT of ``benchmarks/protection.py``: pre-trained here on a pretext mixture, owner task
``mnist``, partners ``mnist_rot90``, ``mnist_invert``, ``mnist_hflip``, ``digits``), per seed:

1. the owner fine-tunes with ``MergeGuardCallback(ownership_key=...)``: the default stage 2 (scale-adversarial, at
   the callback's default guard-rail tolerance of 1 point), then the secret key
   (``lightning_mergeguard.ownership.weight_key``); the unprotected fine-tune of the same seed is the baseline;
2. every merge of the committed grid (``benchmarks/_grid.py``: task arithmetic, TIES, DARE, DELLA, Model Stock,
   SCE, Karcher, RAM, Multi-SLERP, NuSLERP, NearSwap, near copies, layer-wise merges...) of the protected release
   with the four partners (none of which stage 2 saw), each also after what a free-rider does to hide or repair it:
   re-parameterised (residual stream and units permuted, channels rescaled up to 4x: the same function), int8
   per-row quantization, a low-rank truncation of the task vector (10% of the rank: the attack on the key's dense
   part), Gaussian noise (2x to 6x each tensor's task-vector RMS: drowning the key), merged from the release
   re-aligned first to theta_pre or to a partner (``align_to_base``: the informed free-rider's un-hiding step), and
   for the merges named in ``ATTACKED`` (every merge with ``--repair-every-merge``) a repair (10 and 50 AdamW steps
   on 64 owner images) and a removal attempt (50 and 200 steps on the owner's clean training data);
3. a cell is **stopped** when its owner-task accuracy is at most half the unprotected model's best merge, **caught**
   when ``verify_ownership`` (white-box key test, as published and aligned to theta_pre; Bonferroni) gives
   p <= 1e-3;
4. negatives (never derived from the release): theta_pre, the partners, the unprotected owner fine-tune, five
   independent fine-tunes of the owner's task (other seeds and other training data) and the whole grid with an
   independent fine-tune in the owner's place; the smallest p-value any of them reached is reported.

    python benchmarks/stop_or_catch.py                       # seeds 0 1 2, about an hour on 2 CPU cores
    python benchmarks/stop_or_catch.py --seeds 1 2 --append  # add seeds to the committed results
    python benchmarks/stop_or_catch.py --seeds 0 --extend --repair-every-merge  # add cells to a committed seed
    python benchmarks/stop_or_catch.py --report-only         # table and plot again from the JSON

Writes ``benchmarks/results/stop_or_catch.{json,md,png}`` (``stop_or_catch_tolerance<T>.*`` with another
``--tolerance``). The fine-tunes of a seed are cached under ``.cache/stop-or-catch/``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (
    CACHE,
    MEASURED_TOLERANCE,
    RESULTS,
    environment,
    make_guard,
    markdown_table,
    save_png,
    write_results,
)
from benchmarks._grid import grid_configs, layer_count
from lightning_mergeguard.ownership.weight_key import DEFAULT_STRENGTH
from lightning_mergeguard.protection.stage2.base import DEFAULT_TOLERANCE

State = dict[str, Tensor]
OWNER = "mnist"
ALPHA = 1e-3
STOP = 0.5
EPOCHS, PRETRAIN_EPOCHS, STAGE2_STEPS = 3, 4, 150
LAMBDAS = (0.1, 0.3, 0.5, 0.7, 1.0)
ATTACKED = (
    "TA owner 1 / partners 0.1",
    "TA owner 1 / partners 0.3",
    "TA owner 0.6 / partners 0.1",
    "TIES-norm owner 1 / partners 0.1",
    "uniform TA λ=0.3",
    "DARE-TIES (study)",
    "Multi-SLERP owner 0.8",
    "Model Stock",  # keeps the least of the owner's key: the cell the 0.05 key left open on every seed
)
INDEPENDENT = 5
REPAIR, REMOVAL = (10, 50), (50, 200)  # steps; each pair from one run (train_on_owner)
NOISE = (2, 4, 5, 6)  # Gaussian noise, times each tensor's task-vector RMS: from barely felt to the release stopped
REALIGN_PARTNER = "mnist_hflip"  # the partner a free-rider re-aligns the release to (theta_pre is the other anchor)
GRID: tuple[str, ...] | None = None  # the merges of the grid to run (None: all; the smoke test runs a few)


@functools.lru_cache(maxsize=1)
def shared() -> tuple[Any, Any, State, dict[str, State]]:
    """theta_pre, the task heads and the partners (seed 1): the same for every seed of the owner."""
    from lightning_mergeguard.demos.vision_tasks import VISION_TASKS, finetune_vit_task, fit_task_heads, pretrain_vit

    visual = pretrain_vit("small", epochs=PRETRAIN_EPOCHS)
    heads = fit_task_heads(visual, list(VISION_TASKS))
    pre = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    partners = {t: finetune_vit_task(visual, heads, t, epochs=EPOCHS) for t in VISION_TASKS if t != OWNER}
    return visual, heads, pre, partners


def cached_owner_models(folder: Path, make: Callable[[Path], tuple[State, State, dict]], what: str) -> dict[str, Any]:
    """A seed's ``unprotected`` fine-tune, ``release``, its ``key`` and the callback's ``report``, cached in ``folder``.

    ``make(key_file)`` trains them (the callback writing the key to ``key_file``) and returns ``(unprotected,
    release, report)``; it runs only when ``folder`` lacks a file. ``what`` names the model for the key's names
    (``"backbone.x"`` or ``"model.x"`` -> ``"x"``).
    """
    from safetensors.torch import load_file

    from lightning_mergeguard.io import atomic_write_json, save_safetensors
    from lightning_mergeguard.ownership.weight_key import WeightKey

    files = {n: folder / f"{n}.safetensors" for n in ("unprotected", "release")}
    if not all(f.is_file() for f in (*files.values(), folder / "owner.key", folder / "report.json")):
        with tempfile.TemporaryDirectory() as tmp:
            key_file = Path(tmp) / "owner.key"
            unprotected, release, report = make(key_file)
            folder.mkdir(parents=True, exist_ok=True)
            WeightKey.load(key_file).save(folder / "owner.key")
        for name, state in (("unprotected", unprotected), ("release", release)):
            save_safetensors(files[name], {k: v.contiguous() for k, v in state.items()})
        atomic_write_json(folder / "report.json", json.loads(json.dumps(report, default=str)))
    unprotected, release = (load_file(files[n]) for n in ("unprotected", "release"))
    return {
        "unprotected": unprotected,
        "release": release,
        "key": WeightKey.load(folder / "owner.key").matched_to(release.keys(), what=what),
        "report": json.loads((folder / "report.json").read_text()),
    }


def build(seed: int, tolerance: float = DEFAULT_TOLERANCE, key_strength: float = DEFAULT_STRENGTH) -> dict[str, Any]:
    """The shared models, and the owner's unprotected and protected fine-tunes (``seed``).

    The two fine-tunes, the key and the callback's report are cached under
    ``.cache/stop-or-catch/tolerance<T>-epochs<E>-stage2-<S>-key<K>-seed<seed>/`` (``--extend`` reuses them).
    """
    from lightning_mergeguard.demos.vision_tasks import finetune_vit_task

    visual, heads, pre, partners = shared()

    def make(key_file: Path) -> tuple[State, State, dict]:
        unprotected = finetune_vit_task(visual, heads, OWNER, epochs=EPOCHS, seed=100 + seed)
        guard = make_guard(
            progress=False,
            steps=STAGE2_STEPS,
            tolerance=tolerance,
            ownership_key=str(key_file),
            key_strength=key_strength,
        )
        release = finetune_vit_task(visual, heads, OWNER, callbacks=[guard], epochs=EPOCHS, seed=100 + seed)
        return unprotected, release, guard.report

    folder = (
        CACHE
        / "stop-or-catch"
        / f"tolerance{tolerance:g}-epochs{EPOCHS}-stage2-{STAGE2_STEPS}-key{key_strength:g}-seed{seed}"
    )
    return {"visual": visual, "heads": heads, "pre": pre, "partners": partners,
            **cached_owner_models(folder, make, what="the tower")}  # fmt: skip


def independent_finetune(visual, heads, k: int, steps: int = 280) -> State:
    """An honest third party's fine-tune of the owner's task: its own data split and seed (the hard negative)."""
    from lightning_mergeguard.demos.vision_tasks import image_task_data

    torch.manual_seed(1000 + k)
    model = copy.deepcopy(visual).train()
    x, y = image_task_data(OWNER, "train", seed=1000 + k).tensors  # another shuffle: other training images
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(heads[OWNER](model(x[idx])), y[idx]).backward()
        opt.step()
    return {k2: v.detach().clone() for k2, v in model.state_dict().items()}


def train_on_owner(
    visual, heads, state: State, steps: tuple[int, ...], lr: float, examples: int | None
) -> dict[int, State]:
    """AdamW on the owner's training images, a repair (64 images) or a removal attempt (all of them, batches of 64).

    One run of ``max(steps)`` steps; returns its weights after each of ``steps``. Nothing depends on the run's length
    (constant lr, batches drawn in order from one seeded generator), so the weights after ``n`` steps are those of an
    ``n``-step run.
    """
    from lightning_mergeguard.demos.vision_tasks import image_task_data

    torch.manual_seed(7)
    model = copy.deepcopy(visual).train()
    model.load_state_dict(state)
    x, y = image_task_data(OWNER, "train").tensors
    if examples is not None:
        x, y = x[:examples], y[:examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    taken: dict[int, State] = {}
    for step in range(1, max(steps) + 1):
        idx = torch.randint(0, len(y), (64,)) if examples is None else torch.arange(len(y))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(heads[OWNER](model(x[idx])), y[idx]).backward()
        opt.step()
        if step in steps:
            taken[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return taken


def reparameterised(visual, state: State, seed: int) -> State:
    """The merge in other coordinates: stream and units permuted, channels rescaled (outputs unchanged)."""
    from lightning_mergeguard.ownership.alignment import find_unit_groups, permute_units
    from lightning_mergeguard.protection.release.residual import (
        draw_permutation,
        find_residual_stream,
        permute_residual,
    )
    from lightning_mergeguard.protection.release.symmetry import amplify_state, find_symmetries

    stream = find_residual_stream(visual)
    out = permute_residual(state, stream, draw_permutation(stream.width, seed))
    for i, g in enumerate(find_unit_groups(visual)):
        out = permute_units(out, g, draw_permutation(g.units, seed + 1 + i))
    return amplify_state(out, find_symmetries(visual), 4.0, seed=seed)


def realigned(
    release: State, pre: State, partner: tuple[str, State], module
) -> Iterator[tuple[str, Callable[[], State]]]:
    """``(attack, align)``: the release as an informed free-rider merges it, re-aligned to an anchor first.

    ``align()`` runs ``align_to_base``, which expresses the release in the anchor's coordinates (stream and units
    permuted, symmetric scales matched to the anchor's norms): what undoes a re-parameterised release, with
    ``theta_pre`` or any ``partner`` as the anchor. Only a caller that still lacks a cell calls it. The LLM track
    (``stop_or_catch_llm.py``) runs these cells too.
    """
    from lightning_mergeguard.ownership.alignment import align_to_base

    for name, anchor in (("θ_pre", pre), (f"partner {partner[0]}", partner[1])):
        yield f"release re-aligned to {name}, then merged", functools.partial(align_to_base, release, anchor, module)


def noised(state: State, pre: State, scale: float, seed: int) -> State:
    """Gaussian noise added to every floating tensor, ``scale`` times the RMS of its task vector (``state - pre``).

    What a free-rider adds to drown a watermark: the key's statistic sees the noise as variance.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, w in state.items():
        if not w.is_floating_point() or w.ndim == 0:
            out[n] = w
            continue
        rms = (w.float() - pre[n].float()).square().mean().sqrt()
        out[n] = w + (scale * rms * torch.randn(w.shape, generator=gen)).to(w.device, w.dtype)
    return out


def low_rank(state: State, pre: State, names, keep: float = 0.1) -> State:
    """The task vector of every keyed matrix truncated to ``keep`` of its rank (SVD)."""
    out = dict(state)
    for n in names:
        tau = (state[n] - pre[n]).reshape(state[n].shape[0], -1)
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        r = max(1, int(keep * len(s)))
        out[n] = pre[n] + ((u[:, :r] * s[:r]) @ vh[:r]).reshape(state[n].shape)
    return out


def grid_merges(
    configs, partners: dict[str, State], pre: State, owner: State, labels, owner_name: str
) -> Iterator[tuple[str, State]]:
    """``(label, merge)`` of ``owner`` (``owner_name`` in ``configs``) with the partners, for each of ``labels``.

    ``configs``: ``grid_configs`` entries. One merge at a time, so no more than one is held.
    """
    from lightning_mergeguard.merging import merge

    states = {**partners, owner_name: owner}
    for label in labels:
        cfg, used = configs[label]
        base = pre if cfg.get("base_model") == "pre" else None
        yield label, merge(cfg, {n: states[n] for n in {owner_name, *used}}, base, seed=0, check_base=False)


def negative_models(b: dict[str, Any], configs, labels) -> Iterator[tuple[str, Callable[[], State]]]:
    """``(name, make)`` of a seed's negatives (``b``: :func:`build`): models never derived from the release.

    theta_pre, the partners, the unprotected owner fine-tune, ``INDEPENDENT`` independent fine-tunes of the owner's
    task, the merges of ``labels`` with independent fine-tune 0 in the owner's place, and averages of independent
    fine-tunes. ``make()`` builds one (an independent fine-tune is trained once, when first needed).
    """
    visual, heads, pre, partners = b["visual"], b["heads"], b["pre"], b["partners"]
    yield "theta_pre", lambda: pre
    for t, s in partners.items():
        yield f"partner {t}", lambda s=s: s
    yield "unprotected owner fine-tune (before the key)", lambda: b["unprotected"]
    indep = functools.cache(lambda k: independent_finetune(visual, heads, k))
    for k in range(INDEPENDENT):
        yield f"independent fine-tune {k}", functools.partial(indep, k)
    for label in labels:
        yield (f"{label} (independent fine-tune 0 as owner)",
               lambda label=label: next(grid_merges(configs, partners, pre, indep(0), [label], OWNER))[1])  # fmt: skip
    for k1, k2 in itertools.combinations(range(3), 2):
        yield (f"average of independent fine-tunes {k1}, {k2}",
               lambda k1=k1, k2=k2: {n: (indep(k1)[n] + indep(k2)[n]) / 2 for n in pre})  # fmt: skip


def owner_training() -> dict[str, tuple[tuple[int, ...], float, int | None]]:
    """``attack name -> (the run's steps, lr, owner images; None: all, in batches of 64)``: repair and removal."""
    return {"repair": (REPAIR, 5e-4, 64), "removal": (REMOVAL, 1e-4, None)}


def run_seed(
    seed: int,
    bar,
    tolerance: float = DEFAULT_TOLERANCE,
    done: dict[str, Any] | None = None,
    attacked: tuple[str, ...] | None = ATTACKED,
    key_strength: float = DEFAULT_STRENGTH,
) -> dict[str, Any]:
    """Every cell and negative of ``seed``; ``done``: that seed's committed results, whose cells are kept.

    With ``done``, only the cells, negatives and unprotected merges it lacks are computed (``--extend``); a kept
    cell is not recomputed. ``attacked``: the merges that are also repaired and fine-tuned further (``None``: every
    merge of the grid).
    """
    from lightning_mergeguard.demos.vision_tasks import vit_task_accuracy
    from lightning_mergeguard.ownership.verify import verify_ownership
    from lightning_mergeguard.quantization import treated_state

    t0 = time.perf_counter()
    b = build(seed, tolerance, key_strength)
    visual, heads, pre, key = b["visual"], b["heads"], b["pre"], b["key"]
    partners = b["partners"]
    done = done or {}

    def acc(state: State) -> float:
        return vit_task_accuracy(visual, heads, state, OWNER)

    def test(state: State) -> dict[str, Any]:
        v = verify_ownership(state, pre, key, module=visual, alpha=ALPHA, check_base=False)
        return {"p": v.p_value, "log10_p": v.log10_p}

    configs = grid_configs(OWNER, list(partners), LAMBDAS, layers=layer_count(pre))
    labels = list(configs) if GRID is None else list(GRID)
    attacked = tuple(labels) if attacked is None else attacked
    missing = [m for m in attacked if m not in configs]
    if missing:
        raise SystemExit(f"ATTACKED names merges the grid does not have: {missing}")

    def grid(owner_state: State, which) -> Iterator[tuple[str, State]]:
        return grid_merges(configs, partners, pre, owner_state, which, owner_name=OWNER)

    # the unprotected model's best merge: the denominator of "stopped"
    unprotected_grid = dict(done.get("unprotected_grid", {}))
    todo = [m for m in labels if m not in unprotected_grid]
    unprotected_grid.update({label: acc(s) for label, s in grid(b["unprotected"], todo)})
    best_label = max(unprotected_grid, key=unprotected_grid.get)
    best = unprotected_grid[best_label]
    cells: dict[str, dict[str, Any]] = dict(done.get("cells", {}))

    def cell(label: str, how: str, state: State) -> None:
        a = acc(state)
        cells[f"{label} | {how}"] = {"merge": label, "attack": how, "owner": a, **test(state)}  # ratio: below
        bar.update()

    treatments = {
        "as merged": lambda s: s,
        "re-parameterised": lambda s: reparameterised(visual, s, seed),
        "int8 per row": lambda s: treated_state(s, "int8-row"),
        "low-rank 10%": lambda s: low_rank(s, pre, key.names),
        **{f"noise {k}x task vector": lambda s, k=k: noised(s, pre, k, seed) for k in NOISE},
    }
    expensive = owner_training()
    release = [("release alone", b["release"])]

    def lacking(which, attacks) -> list[str]:
        return [m for m in which if any(f"{m} | {h}" not in cells for h in attacks)]

    for label, merged in itertools.chain(release, grid(b["release"], lacking(labels, treatments))):
        for how, fn in treatments.items():
            if f"{label} | {how}" not in cells:
                cell(label, how, fn(merged))
    attacks = [f"{name} {n}" for name, (steps, *_) in expensive.items() for n in steps]
    for label, merged in itertools.chain(release, grid(b["release"], lacking(attacked, attacks))):
        for name, (steps, lr, examples) in expensive.items():
            if any(f"{label} | {name} {n}" not in cells for n in steps):
                for n, state in train_on_owner(visual, heads, merged, steps, lr, examples).items():
                    cell(label, f"{name} {n}", state)
    # the same repairs and removal attempts from theta_pre: what the owner's data gives without the owner's model
    from_pre = dict(done.get("from_pre", {}))
    for name, (steps, lr, examples) in expensive.items():
        if any(f"{name} {n}" not in from_pre for n in steps):
            taken = train_on_owner(visual, heads, pre, steps, lr, examples)
            from_pre.update({f"{name} {n}": acc(state) for n, state in taken.items()})
    # the informed free-rider undoes any re-parameterisation of the release first (anchor: theta_pre or a partner)
    for how, align in realigned(b["release"], pre, (REALIGN_PARTNER, partners[REALIGN_PARTNER]), visual):
        todo = lacking(labels, [how])
        if not todo and f"release alone | {how}" in cells:
            continue
        aligned = align()
        if f"release alone | {how}" not in cells:
            cell("release alone", how, aligned)
        for label, merged in grid(aligned, todo):
            cell(label, how, merged)
    for c in cells.values():  # every cell, kept ones too, against the best of the grid
        c["ratio"] = c["owner"] / best
    negatives: dict[str, dict[str, Any]] = dict(done.get("negatives", {}))

    def negative(name: str, make: Callable[[], State]) -> None:
        if name not in negatives:
            negatives[name] = test(make())
            bar.update()

    for name, make in negative_models(b, configs, labels):
        negative(name, make)
    report = b["report"] or {}
    return {
        "seed": seed,
        "pre_own": acc(pre),  # theta_pre with the owner's head: what a merge must beat to have taken anything
        "unprotected_own": acc(b["unprotected"]),
        "release_own": acc(b["release"]),
        "stage2_score": {"before": report.get("score_before"), "after": report.get("score_after")},
        "key": {k: v for k, v in (report.get("ownership_key") or {}).items() if k != "file"},
        "unprotected_best": best,
        "unprotected_best_merge": best_label,
        "unprotected_grid": unprotected_grid,
        "from_pre": from_pre,
        "cells": cells,
        "negatives": negatives,
        "seconds": time.perf_counter() - t0 + done.get("seconds", 0.0),
    }


def committed_seeds(seeds: list[int], name: str = "stop_or_catch") -> dict[int, dict[str, Any]]:
    """``seed -> its committed results`` (``<name>.json``), for the benchmarks that build on them.

    Raises:
        SystemExit: If a seed has no committed results.
    """
    committed = {r["seed"]: r for r in json.loads((RESULTS / f"{name}.json").read_text())["seeds"]}
    missing = [s for s in seeds if s not in committed]
    if missing:
        raise SystemExit(f"{name}.json has no seed {missing}: run benchmarks/stop_or_catch.py for it first")
    return committed


def committed_build(run: dict[str, Any]) -> dict[str, Any]:
    """:func:`build` of a committed seed (``run``: its results), with the key strength its release was made with."""
    key = run.get("key") or {}
    return build(run["seed"], key_strength=key.get("requested_strength", key.get("strength", DEFAULT_STRENGTH)))


def add_against(parser: argparse.ArgumentParser) -> None:
    """``--against NAME``: the committed stop_or_catch results (and so the releases) a follow-up benchmark uses."""
    parser.add_argument("--against", default="stop_or_catch", help="the stop_or_catch results file to build on "
                        "(default stop_or_catch, the default key; stop_or_catch_key0.05: the 0.05 key)")  # fmt: skip


def add_key_strength(parser: argparse.ArgumentParser, writes: str) -> None:
    """``--key-strength K``: the release's key strength (another than the default writes ``<writes>_key<K>``)."""
    parser.add_argument("--key-strength", type=float, default=DEFAULT_STRENGTH, help="the ownership key's strength "
                        f"(default {DEFAULT_STRENGTH:g}, Release's; another writes {writes}_key<K>.*)")  # fmt: skip


def key_suffix(strength: float) -> str:
    """The results-name suffix of a key strength ("" at the default)."""
    return "" if strength == DEFAULT_STRENGTH else f"_key{strength:g}"


def key_flag(strength: float) -> str:
    """``--key-strength``, as the command line of a results file writes it ("" at the default)."""
    return "" if strength == DEFAULT_STRENGTH else f" --key-strength {strength:g}"


def against_flag(args: argparse.Namespace) -> str:
    """``--against``, as the command line of a results file writes it ("" at the default)."""
    return "" if args.against == "stop_or_catch" else f" --against {args.against}"


def classify(cell: dict[str, Any]) -> str:
    stopped = cell["ratio"] <= STOP
    caught = cell["p"] <= ALPHA
    return "stopped and caught" if stopped and caught else "stopped" if stopped else "caught" if caught else "neither"


def summary(res: dict[str, Any]) -> tuple[str, list[str]]:
    rows, neither = [], []
    for run in res["seeds"]:
        counts = {"stopped": 0, "caught": 0, "stopped and caught": 0, "neither": 0}
        for name, cell in run["cells"].items():
            counts[classify(cell)] += 1
            if classify(cell) == "neither":
                pre = run.get("from_pre", {}).get(cell["attack"])
                same = "" if pre is None else f"; the same {cell['attack']} from θ_pre: {pre:.1f}%"
                neither.append(f"seed {run['seed']}: {name} (owner {cell['owner']:.1f}%, p = {cell['p']:.2g}{same})")
        neg_min = min(n["p"] for n in run["negatives"].values())
        worst_cell = max((c for c in run["cells"].values() if c["p"] > ALPHA), key=lambda c: c["ratio"], default=None)
        rows.append(
            [
                run["seed"],
                f"{run['unprotected_own']:.1f} → {run['release_own']:.1f}",
                f"{run['unprotected_best']:.1f}",
                "–" if run.get("pre_own") is None else f"{run['pre_own']:.1f}",
                len(run["cells"]),
                counts["stopped"] + counts["stopped and caught"],
                counts["caught"] + counts["stopped and caught"],
                counts["neither"],
                "–" if worst_cell is None else f"{worst_cell['ratio']:.2f}",
                max(c["log10_p"] for c in run["cells"].values()),
                len(run["negatives"]),
                f"{neg_min:.3g}",
            ]
        )
    headers = [
        "seed",
        "own accuracy (unprotected → release)",
        "unprotected best merge",
        "θ_pre on the owner's task",
        "cells",
        "stopped",
        "caught (p ≤ 1e-3)",
        "neither",
        "best uncaught cell / unprotected best",
        "largest log10 p of a cell",
        "negatives",
        "smallest negative p",
    ]
    return markdown_table(headers, rows), neither


def plot(res: dict[str, Any], path: Path, track: str = "vision") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    colors = {"as merged": "C0", "re-parameterised": "C1", "int8 per row": "C2", "low-rank 10%": "C3",
              "int8-row release, then merged": "C5", "fp16 release, then merged": "C6",
              "noise 2x task vector": "navy", "noise 4x task vector": "tab:brown",
              "noise 5x task vector": "gold", "noise 6x task vector": "tab:pink"}  # fmt: skip

    def color(attack: str) -> tuple[str, str]:
        """``(colour, legend label)`` of an attack."""
        if attack in colors:
            return colors[attack], attack
        if attack.startswith("release re-aligned to θ_pre"):
            return "C7", attack
        if attack.startswith("release re-aligned"):
            return "C8", "release re-aligned to a partner, then merged"
        if attack.endswith("release, then merged"):
            return "C9", "4-bit release, then merged"
        return "C4", "repair / removal"

    legend = dict(sorted({color(c["attack"]) for run in res["seeds"] for c in run["cells"].values()}))
    for run in res["seeds"]:
        for cell in run["cells"].values():
            y = min(-cell["log10_p"], 300)
            ax.scatter(cell["ratio"], max(y, 0.01), s=10, color=color(cell["attack"])[0], alpha=0.6)
        for neg in run["negatives"].values():
            ax.scatter(0.02, max(-neg["log10_p"], 0.01), s=10, color="k", marker="x")
    ax.set_yscale("symlog", linthresh=1)
    ax.axhline(3, color="r", ls="--", lw=1)
    ax.axvline(STOP, color="g", ls="--", lw=1)
    ax.text(STOP + 0.01, 0.3, "stopped ←", color="g")
    pre = [r["pre_own"] / r["unprotected_best"] for r in res["seeds"] if r.get("pre_own") is not None]
    if pre:  # what the base model scores without any merge
        ax.axvline(sum(pre) / len(pre), color="0.4", ls=":", lw=1)
        ax.text(sum(pre) / len(pre) + 0.01, 0.1, "θ_pre itself", color="0.4")
    ax.text(0.05, 4, "caught ↑ (p ≤ 1e-3)", color="r")
    for c, label in legend.items():
        ax.scatter([], [], color=c, label=label)
    ax.scatter([], [], color="k", marker="x", label="negatives (never derived)")
    ax.set_xlabel("owner-task accuracy / unprotected model's best merge")
    ax.set_ylabel("-log10 p (white-box key test; capped at 300)")
    ax.set_title(f"Stop or catch, {track} track: every merge of the protected release")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (0 1 2)")
    parser.add_argument("--append", action="store_true", help="add these seeds to the committed results file")
    parser.add_argument("--extend", action="store_true",
                        help="keep the committed cells of these seeds and run only the ones they lack")  # fmt: skip
    parser.add_argument("--repair-every-merge", action="store_true",
                        help="repair and fine-tune further every merge (default: those in ATTACKED)")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"the guard rail's tolerance (default {DEFAULT_TOLERANCE:g}, the callback's; another "
                        "value writes stop_or_catch_tolerance<T>.*)")  # fmt: skip
    add_key_strength(parser, "stop_or_catch")
    args = parser.parse_args()
    name = "stop_or_catch" if args.tolerance == DEFAULT_TOLERANCE else f"stop_or_catch_tolerance{args.tolerance:g}"
    name += key_suffix(args.key_strength)
    path = RESULTS / f"{name}.json"
    if args.report_only:
        report(json.loads(path.read_text()), name)
        return
    start = time.perf_counter()
    old = json.loads(path.read_text()) if (args.append or args.extend) and path.is_file() else None
    kept = {r["seed"]: r for r in (old or {}).get("seeds", [])}
    runs = dict(kept)  # a seed run again replaces its committed results once it is done
    command = "python benchmarks/stop_or_catch.py --seeds " + " ".join(map(str, args.seeds))
    command += "" if args.tolerance == DEFAULT_TOLERANCE else f" --tolerance {args.tolerance:g}"
    command += key_flag(args.key_strength)
    command += " --repair-every-merge" if args.repair_every_merge else ""
    command += " --extend" if args.extend else " --append" if old is not None else ""
    res: dict[str, Any] = {}
    with tqdm(desc="stop or catch", unit="cell") as bar:
        for seed in args.seeds:  # written after each seed: a long run keeps what it finished
            attacked = None if args.repair_every_merge else ATTACKED
            done = kept.get(seed) if args.extend else None
            runs[seed] = run_seed(seed, bar, args.tolerance, done, attacked, args.key_strength)
            res = {
                "command": command if old is None else f"{old['command']}; {command}",
                "environment": environment(),
                "baseline": "the unprotected fine-tune of the same seed: its best merge on the same grid (stopped = "
                "owner accuracy at most 0.5x that); negatives: models never derived from the release",
                "alpha": ALPHA,
                "stop": STOP,
                "tolerance": args.tolerance,
                "key_strength": args.key_strength,
                "attacked": "every merge of the grid" if attacked is None else list(attacked),
                "realign_partner": REALIGN_PARTNER,
                **({"notes": old["notes"]} if old and "notes" in old else {}),
                "seeds": [runs[k] for k in sorted(runs)],
                "seconds": time.perf_counter() - start + (old or {}).get("seconds", 0.0),
            }
            write_results(name, res)
    report(res, name)


def report(res: dict[str, Any], name: str = "stop_or_catch", track: str = "vision") -> None:
    """Write ``<name>.md`` (the per-seed table and every cell neither stopped nor caught) and ``<name>.png``."""
    table, neither = summary(res)
    tolerance = res.get("tolerance", MEASURED_TOLERANCE)
    unit = "point" if tolerance == 1 else "points"
    key = res.get("key_strength", 0.05)  # results written before the option ran at 0.05
    text = f"#### Stop or catch, {track} track (guard rail at {tolerance:g} {unit}, key strength {key:g})\n\n"
    text += table + "\n\n"
    text += "Cells neither stopped nor caught:\n\n" + ("\n".join(f"- {n}" for n in neither) or "- none") + "\n"
    (RESULTS / f"{name}.md").write_text(text, encoding="utf-8")
    plot(res, RESULTS / f"{name}.png", track)
    print(text)
    runs = res["seeds"]
    cells = sum(len(r["cells"]) for r in runs)
    caught = sum(classify(c) != "neither" for r in runs for c in r["cells"].values())
    neg = min(n["p"] for r in runs for n in r["negatives"].values())
    print(f"headline: {caught}/{cells} cells stopped or caught; smallest negative p {neg:.3g} (alpha {ALPHA:g})")
    if not math.isfinite(neg):
        raise SystemExit("a negative's p-value is not finite")


if __name__ == "__main__":
    main()
