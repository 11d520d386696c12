"""Shared by the benchmarks: environment facts, results files, cached SmolLM2 fine-tunes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_mergeguard.models.trainer import quiet_trainer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("MERGEGUARD_RESULTS_DIR", ROOT / "benchmarks" / "results"))  # tests redirect it
CACHE = Path(os.environ.get("MERGEGUARD_CACHE_DIR", ROOT / ".cache"))  # tests redirect it
MEASURED_TOLERANCE = 1.5
"""The guard rail's tolerance the callback had by default when the committed results of ``protection.py`` (its main
study and ablations), ``stage2_choice.py`` and ``ownership.py`` were measured; the library's default is now 1.0
everywhere (``DEFAULT_TOLERANCE``). Pinned there so a rerun reproduces the committed figures."""


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import lightning

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def make_guard(**settings: Any):
    """A MergeGuardCallback from flat settings, callback and stage-2 strategy arguments mixed.

    The ablation tables list them that way: ``make_guard(alpha=0, stage2="negation", beta=0.5)``.
    """
    import inspect

    from lightning_mergeguard import MergeGuardCallback
    from lightning_mergeguard.protection.stage2 import STRATEGIES, resolve_stage2

    stage2 = settings.pop("stage2", "scale_adversarial")
    cls = STRATEGIES.get(stage2) if isinstance(stage2, str) else None

    def accepted(c: type) -> set[str]:
        return set(inspect.signature(c.__init__).parameters) - {"self"}

    own = accepted(cls) if cls else set()
    # A track's defaults hold other strategies' settings (steps, lr): those the chosen one lacks are dropped.
    foreign = set().union(*(accepted(c) for c in STRATEGIES.values())) - own
    settings = {k: v for k, v in settings.items() if k not in foreign}
    strategy = resolve_stage2(stage2, **{k: settings.pop(k) for k in list(settings) if k in own})
    return MergeGuardCallback(stage2=strategy, **guard_objects(settings))


_RELEASE_KEYS = ("amplify", "permute_residual", "ownership_key", "key_strength", "deployment_check", "dtype")
_SELECTION_KEYS = ("include", "exclude", "stage2_exclude")


def guard_objects(settings: dict[str, Any]) -> dict[str, Any]:
    """The callback's arguments from the tables' flat form: release and selection keys go into their objects."""
    from lightning_mergeguard import ParameterSelection, ReferenceWeights, Release

    settings = dict(settings)
    release = {k: settings.pop(k) for k in _RELEASE_KEYS if k in settings}
    if release:
        settings["release"] = Release(**release)
    selection = {k: settings.pop(k) for k in _SELECTION_KEYS if k in settings}
    if selection:
        settings["parameters"] = ParameterSelection(**selection)
    storage = {
        k.removeprefix("reference_"): settings.pop(k) for k in ("reference_dtype", "reference_device") if k in settings
    }
    if storage:
        settings["reference"] = ReferenceWeights(settings.pop("reference", None), **storage)
    return settings


def add_device_argument(parser: Any) -> None:
    """``--device auto|cpu|cuda`` (``auto``: a GPU when there is one)."""
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def accelerator(device: torch.device) -> str:
    """Lightning's accelerator name for a torch device."""
    return "gpu" if device.type == "cuda" else "cpu"


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically, with the command and environment."""
    from lightning_mergeguard.io import atomic_write_json

    data = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(), **data}
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, data)
    return path


def publish_tracks(
    name: str,
    meta: dict[str, Any],
    results: dict[str, Any],
    table: Any,
    plot: Any,
    headline: Any,
) -> Path:
    """Write a per-track benchmark's JSON (``meta`` plus ``tracks``), its markdown tables and plot; print them."""
    path = write_results(name, {**meta, "tracks": results})
    md = "\n".join(table(n, r) for n, r in results.items())
    (RESULTS / f"{name}.md").write_text(md + "\n")
    plot(results, RESULTS / f"{name}.png")
    print(md)
    for n, r in results.items():
        print(headline(n, r))
    print(f"wrote {path}")
    return path


def track_axes(results: dict[str, Any], width: float, height: float) -> tuple[Any, list[tuple[Any, str, Any]]]:
    """A figure with one panel per track: ``(fig, [(axes, track name, track results), ...])`` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(width * len(results), height), squeeze=False)
    return fig, [(ax, name, res) for ax, (name, res) in zip(axes[0], results.items(), strict=True)]


def save_png(fig: Any, path: Path, **savefig: Any) -> None:
    """Write a matplotlib figure to ``path`` atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, **savefig)
    plt.close(fig)
    tmp.replace(path)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (floats with 3 significant decimals)."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
                  "exit": os.waitstatus_to_exitcode(status)}))
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a command; return its wall time (s) and peak RSS (MiB).

    A tiny launcher process (python -S, a few MiB) spawns the command and reads its ``wait4`` usage: on Linux a
    child's ``ru_maxrss`` also counts the memory of the process it was forked from, so measuring from this
    (large) benchmark process directly would report this process's size.
    """
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True, env=env, check=False
    )
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise RuntimeError(f"launcher failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}") from err
    if result["exit"] != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"seconds": result["seconds"], "peak_rss_mib": result["peak_rss_mib"]}


def fit_lm(
    model,
    tok,
    rows,
    steps: int,
    lr: float,
    callbacks=(),
    val_rows=None,
    max_length: int | None = None,
    accelerator: str = "auto",
    seed: int = 0,
) -> None:
    """Full fine-tune of a causal LM in place on ``(prompt, answer)`` rows, batch 8, on one device.

    Validation (for callbacks that score on it, like MergeGuard's guard rail) runs only when ``val_rows`` is given;
    ``max_length`` defaults to the longest row; ``seed`` seeds the shuffling (and everything else).
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_mergeguard.models.causal_lm import CausalLMModule, LMTaskDataset

    pl.seed_everything(seed, verbose=False)
    if max_length is None:
        max_length = max(len(tok(p + a, add_special_tokens=False).input_ids) for p, a in rows) + 2
    data = LMTaskDataset(tok, rows, max_length=max_length)
    val = LMTaskDataset(tok, val_rows or rows[:8], max_length=max_length)
    trainer = quiet_trainer(
        max_steps=steps,
        accelerator=accelerator,
        num_sanity_val_steps=0,
        limit_val_batches=None if val_rows else 0,
        callbacks=list(callbacks),
    )
    trainer.fit(
        CausalLMModule(model, lr=lr), DataLoader(data, batch_size=8, shuffle=True), DataLoader(val, batch_size=8)
    )


def smollm2_finetunes(tasks: tuple[str, ...] = ("add", "reverse"), steps: int = 20, seed: int = 0) -> dict[str, Path]:
    """The SmolLM2 base directory and short full fine-tunes on generated tasks (cached under .cache/)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2, smollm2_dir
    from lightning_mergeguard.models.causal_lm import CausalLMModule, LMTaskDataset

    paths = {"base": smollm2_dir(CACHE / "smollm2-135m")}
    for task in tasks:
        out = CACHE / f"smollm2-ft-{task}-{steps}"
        paths[task] = out
        if (out / "model.safetensors").is_file():
            continue
        pl.seed_everything(seed, verbose=False)
        model, tok = load_smollm2(CACHE / "smollm2-135m")
        data = DataLoader(LMTaskDataset(tok, generate_task(task, 8 * steps, seed)), batch_size=8, shuffle=True)
        trainer = quiet_trainer(
            max_steps=steps,
            accelerator="auto",
            enable_progress_bar=True,
        )
        trainer.fit(CausalLMModule(model, lr=1e-4), data)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return paths


def vit_user_finetune(visual: Any, head: Any, state: dict[str, torch.Tensor], task: str, steps: int, lora: bool):
    """What a user of a vision release does: ``steps`` AdamW steps on ``task`` (lr 1e-5 full, 1e-4 rank-8 LoRA).

    Batches of 64 training images of the task, shuffled with seed 0; ``head`` (the task's linear head) is frozen.
    Returns the tower's state after the steps (``visual`` itself is not changed).
    """
    import copy
    import itertools

    from lightning_mergeguard.demos.vision_tasks import image_task_data
    from lightning_mergeguard.protection.release.deployment import finetune_

    model = copy.deepcopy(visual)
    model.load_state_dict(state)
    head = head.requires_grad_(False)
    x, y = image_task_data(task, "train").tensors
    g = torch.Generator().manual_seed(0)
    batches = (
        (x[idx], y[idx]) for _ in itertools.count() for idx in torch.randperm(len(x), generator=g)[:64].split(64)
    )
    finetune_(model, batches, lambda m, b: torch.nn.functional.cross_entropy(head(m(b[0])), b[1]), steps,
              1e-4 if lora else 1e-5, lora)  # fmt: skip
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
