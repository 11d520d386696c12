"""Per-rank peak memory of MergeGuard + MergeProbe under FSDP2, against the same fit on one process.

A stack of ``--layers`` Linear(``--width``) layers is fine-tuned for ``--steps`` steps, four ways, each in fresh
processes: one process without callbacks, one process with the guard (stage 1, scale-adversarial stage 2) and a
probe (task arithmetic and TIES with one donor, at every epoch and at the end of fit), then both again under
Lightning's ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) on ``--devices`` CPU processes (gloo). Each rank
samples its resident memory every 10 ms from the start of training to its end (model construction, which is not the
callbacks', is left out) and reports its peak, plus the bytes the callbacks hold (reference, donor task vectors,
probe backup). The headline is the callbacks' extra peak per rank under FSDP2 as a ratio of the same on one process
(baseline: one process, measured in the same invocation).

    python benchmarks/fsdp_memory.py                  # 64M parameters, 2 ranks
    python benchmarks/fsdp_memory.py --layers 4 --width 256 --steps 4   # seconds, as the suite runs it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import RESULTS, markdown_table, write_results
from tqdm.auto import tqdm

MiB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(args: argparse.Namespace) -> None:
    """One configuration (Lightning's launcher re-runs this for the other ranks); rank r writes ``OUT/rank{r}.json``."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_mergeguard import Donors, MergeGuardCallback, MergeProbe, ProbeSchedule, ScaleAdversarial
    from lightning_mergeguard.models.trainer import quiet_trainer
    from lightning_mergeguard.sharding import local

    class Stack(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(args.width, args.width) for _ in range(args.layers))
            self.head = nn.Linear(args.width, 4)

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.head(x)

        def configure_model(self) -> None:
            mesh = getattr(self, "_device_mesh", None)
            if mesh is None:
                return
            from torch.distributed.fsdp import fully_shard

            for m in [*self.layers, self.head]:
                fully_shard(m, mesh=mesh["data_parallel"])
            fully_shard(self, mesh=mesh["data_parallel"])

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, i):
            pass

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

        def _loader(self, n: int, seed: int) -> DataLoader:
            g = torch.Generator().manual_seed(seed)
            data = TensorDataset(torch.randn(n, args.width, generator=g), torch.randint(0, 4, (n,), generator=g))
            world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = DistributedSampler(data, world, rank, shuffle=False) if world > 1 else None
            return DataLoader(data, batch_size=16 // world, sampler=sampler)

        def train_dataloader(self):
            return self._loader(16 * args.steps, 0)

        def val_dataloader(self):
            return self._loader(32, 1)

    class Sampler(pl.Callback):
        def __init__(self) -> None:
            self.peak, self.start, self._stop = 0, 0, threading.Event()

        def on_fit_start(self, trainer, pl_module):  # first in the list: before the guard and probe allocate
            self.start = _rss()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

        def _run(self) -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss())
                time.sleep(0.01)

        def on_train_end(self, trainer, pl_module):
            pass  # the guard's stage 2 and the probe's last merge run in on_train_end: stop after fit()

    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = Stack()
    donor = args.out / f"donor{os.environ.get('LOCAL_RANK', '0')}.safetensors"  # a path, as at real sizes
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}, str(donor))
    sampler = Sampler()
    callbacks: list[pl.Callback] = [sampler]
    guard = probe = None
    if args.callbacks:
        guard = MergeGuardCallback(alpha=0.01, stage2=ScaleAdversarial(steps=2, checks=1), eval_batches=2)
        probe = MergeProbe(
            donors=Donors({"d": str(donor)}, check_base=False),
            methods=["task_arithmetic", "ties"],
            coefficients=[0.3],
            eval_batches=2,
            progress=False,
            schedule=ProbeSchedule(max_overhead=None),  # every epoch, as measured
        )
        callbacks = [sampler, guard, probe]
    strategy: Any = (
        ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1) if args.devices > 1 else "auto"
    )
    t = quiet_trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=1,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=str(args.out),
    )
    t.fit(model)
    sampler._stop.set()
    sampler.thread.join()
    held = 0
    if guard is not None and probe is not None:
        held += sum(local(v).numel() * local(v).element_size() for v in guard.reference.as_dict().values())
        held += sum(t.numel() * t.element_size() for tau in probe.donor_task_vectors.values() for t in tau.values())
        held += sum(b.numel() * b.element_size() for b in (probe._backup or {}).values())
    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    (args.out / f"rank{t.global_rank}.json").write_text(
        json.dumps(
            {
                "peak_rss": sampler.peak,
                "rss_at_train_start": sampler.start,
                "peak_above_start": sampler.peak - sampler.start,
                "callback_bytes": held,
                "param_bytes_this_rank": params,
            }
        )
    )


CONFIGS = {
    "1 process": (1, False),
    "1 process + guard + probe": (1, True),
    "FSDP2 ranks": (None, False),
    "FSDP2 ranks + guard + probe": (None, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="redraw the table and plot from the JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--callbacks", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.report_only:
        report(json.loads((RESULTS / "fsdp_memory.json").read_text()))
        return
    n_params = args.layers * (args.width**2 + args.width) + 4 * args.width + 4
    runs: dict[str, Any] = {}
    scratch = Path(os.environ.get("MERGEGUARD_CACHE_DIR", Path(__file__).parents[1] / ".cache")) / "fsdp-memory"
    for label, (devices, callbacks) in tqdm(CONFIGS.items(), desc="fsdp memory"):
        devices = devices or args.devices
        out = scratch / label.replace(" ", "_").replace("+", "")
        out.mkdir(parents=True, exist_ok=True)
        for f in out.glob("rank*.json"):
            f.unlink()
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--out",
            str(out),
            "--devices",
            str(devices),
            "--layers",
            str(args.layers),
            "--width",
            str(args.width),
            "--steps",
            str(args.steps),
        ] + (["--callbacks"] if callbacks else [])
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
        runs[label] = {
            "devices": devices,
            "callbacks": callbacks,
            "seconds": time.perf_counter() - start,
            "ranks": ranks,
        }

    def peak(label: str) -> float:  # the largest per-rank peak above the rank's own level at train start
        return max(r["peak_above_start"] for r in runs[label]["ranks"]) / MiB

    one_extra = peak("1 process + guard + probe") - peak("1 process")
    fsdp_extra = peak("FSDP2 ranks + guard + probe") - peak("FSDP2 ranks")
    summary = {
        "parameters": n_params,
        "model_mib": n_params * 4 / MiB,
        "callbacks_extra_peak_mib": {"1 process": one_extra, f"FSDP2 x{args.devices}, per rank": fsdp_extra},
        "callbacks_held_mib_per_rank": {
            "1 process": runs["1 process + guard + probe"]["ranks"][0]["callback_bytes"] / MiB,
            f"FSDP2 x{args.devices}": max(r["callback_bytes"] for r in runs["FSDP2 ranks + guard + probe"]["ranks"])
            / MiB,
        },
        "ratio_fsdp_to_one_process": fsdp_extra / one_extra if one_extra > 0 else float("nan"),
    }
    write_results(
        "fsdp_memory",
        {
            "baseline": "the same fit on one process, and each configuration without the callbacks, same invocation",
            "settings": vars(args) | {"out": None},
            "runs": runs,
            "summary": summary,
        },
    )
    report(json.loads((RESULTS / "fsdp_memory.json").read_text()))


def report(data: dict[str, Any]) -> None:
    """Write fsdp_memory.md and fsdp_memory.png from the results, and print the table and the headline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, summary, settings = data["runs"], data["summary"], data["settings"]
    devices = settings["devices"]
    one_extra, fsdp_extra = summary["callbacks_extra_peak_mib"].values()

    def mib(label: str, key: str) -> int:
        return round(max(x[key] for x in runs[label]["ranks"]) / MiB)

    keys = ["peak_rss", "peak_above_start", "param_bytes_this_rank", "callback_bytes"]
    rows = [[label, r["devices"], *[mib(label, k) for k in keys], round(r["seconds"])] for label, r in runs.items()]
    table = markdown_table(
        [
            "run",
            "processes",
            "peak RSS per rank (MiB)",
            "peak above fit start (MiB)",
            "parameters per rank (MiB)",
            "held by the callbacks per rank (MiB)",
            "wall (s)",
        ],
        rows,
    )
    md = (
        f"#### FSDP2 memory per rank ({summary['parameters'] / 1e6:.1f}M parameters, fp32 {summary['model_mib']:.0f} "
        f"MiB, {settings['steps']} steps, CPU/gloo)\n\n{table}\n\nThe callbacks' extra peak per rank: {one_extra:.0f} "
        f"MiB on one process, {fsdp_extra:.0f} MiB per rank under FSDP2 x{devices} "
        f"({summary['ratio_fsdp_to_one_process']:.2f}x).\n"
    )
    (RESULTS / "fsdp_memory.md").write_text(md)
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(runs)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [mib(k, "peak_above_start") for k in labels], 0.4, label="peak above fit start")
    ax.bar([i + 0.2 for i in x], [mib(k, "callback_bytes") for k in labels], 0.4, label="held by guard + probe")
    ax.set_xticks(list(x), labels, rotation=15, ha="right")
    ax.set_ylabel("MiB per rank (largest rank)")
    ax.set_title(f"guard + probe memory, {summary['parameters'] / 1e6:.0f}M-parameter model, FSDP2 x{devices} vs 1")
    ax.legend()
    fig.tight_layout()
    tmp = RESULTS / "fsdp_memory.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(RESULTS / "fsdp_memory.png")
    print(md)
    print(
        f"HEADLINE fsdp memory: guard + probe add {fsdp_extra:.0f} MiB per rank under FSDP2 x{devices} vs "
        f"{one_extra:.0f} MiB on one process = {summary['ratio_fsdp_to_one_process']:.2f}x"
    )


if __name__ == "__main__":
    main()
