"""Cost of MergeProbe: training wall time with the probe at its default cadence against training without it.

    python benchmarks/probe_overhead.py [--steps-per-epoch 100] [--epochs 2]

SmolLM2-135M is fine-tuned on a generated task twice in the same process, without and with
``MergeProbe(every_n_epochs=1)`` (task arithmetic and TIES at 0.3 with one donor, 4 evaluation batches, probing
also at the end of fit). The headline is the wall-time ratio. Memory: the tensors the probe holds (weights backup,
donor task vectors, reference) are summed exactly and compared to the model's size, and the process's peak RSS
during probes is sampled. Writes benchmarks/results/probe_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import threading
import time

import lightning.pytorch as pl
import psutil
from _common import (
    CACHE,
    accelerator,
    add_device_argument,
    markdown_table,
    resolve_device,
    smollm2_finetunes,
    write_results,
)
from torch.utils.data import DataLoader

from lightning_mergeguard import MergeProbe
from lightning_mergeguard.demos.smollm2 import generate_task, load_smollm2
from lightning_mergeguard.models.causal_lm import CausalLMModule, LMTaskDataset
from lightning_mergeguard.models.trainer import quiet_trainer


class RSSSampler:
    """Peak resident memory of this process while active (sampled every 10 ms)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


class TimedProbe(MergeProbe):
    """MergeProbe that also records each probe's wall time and the RSS peak above the pre-probe level."""

    probe_seconds: list[float]
    rss_extra: list[int]

    def probe(self, trainer, pl_module, force=False):
        self.__dict__.setdefault("probe_seconds", [])
        self.__dict__.setdefault("rss_extra", [])
        start = time.perf_counter()
        with RSSSampler() as s:
            out = super().probe(trainer, pl_module, force)
        self.probe_seconds.append(time.perf_counter() - start)
        self.rss_extra.append(s.peak - s.start)
        return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    add_device_argument(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    paths = smollm2_finetunes(("add", "reverse"), steps=20)
    model, tok = load_smollm2(CACHE / "smollm2-135m")
    n = 8 * args.steps_per_epoch
    train = DataLoader(LMTaskDataset(tok, generate_task("upper", n)), batch_size=8, shuffle=False)
    val = DataLoader(LMTaskDataset(tok, generate_task("upper", 32, seed=1)), batch_size=8)

    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        module = CausalLMModule(copy.deepcopy(model), lr=1e-4)
        trainer = quiet_trainer(
            max_epochs=args.epochs,
            accelerator=accelerator(device),
            enable_progress_bar=True,
            callbacks=callbacks,
            limit_val_batches=0,
        )
        start = time.perf_counter()
        trainer.fit(module, train)
        return time.perf_counter() - start

    plain = fit([])
    probe = TimedProbe(
        donors={"add": paths["add"]},
        methods=["task_arithmetic", "ties"],
        coefficients=[0.3],
        eval_dataloaders=val,
        eval_batches=4,
        every_n_epochs=1,
        progress=False,
    )
    probed = fit([probe])
    budgeted_probe = TimedProbe(
        donors={"add": paths["add"]},
        methods=["task_arithmetic", "ties"],
        coefficients=[0.3],
        eval_dataloaders=val,
        eval_batches=4,
        every_n_steps=10,
        max_overhead=0.05,
        progress=False,
    )
    budgeted = fit([budgeted_probe])
    model_bytes = tensor_bytes(model.parameters())
    held = tensor_bytes(probe._backup.values()) + sum(tensor_bytes(t.values()) for t in probe._donor_tau.values())
    held += tensor_bytes(probe.reference.as_dict().values())
    ratio = probed / plain
    rows = [
        ["training without probe (s)", plain],
        ["training with probe (s)", probed],
        ["wall-time ratio", ratio],
        ["training with probe every 10 steps, max_overhead=0.05 (s)", budgeted],
        ["wall-time ratio with the budget", budgeted / plain],
        [
            "probes run / skipped with the budget",
            f"{len(budgeted_probe.probe_seconds)} / {budgeted_probe.skipped_for_budget}",
        ],
        ["probes run", len(probe.probe_seconds)],
        ["seconds per probe (median)", sorted(probe.probe_seconds)[len(probe.probe_seconds) // 2]],
        ["probe-held tensors / model size", held / model_bytes],
        ["peak RSS above pre-probe level / model size", max(probe.rss_extra) / model_bytes],
    ]
    table = markdown_table(["measure", "value"], rows)
    path = write_results(
        "probe_overhead",
        {
            "setting": f"SmolLM2-135M full fine-tune, batch 8x32 tokens, {args.steps_per_epoch} steps/epoch, "
            f"{args.epochs} epochs; probe every epoch + at the end: task_arithmetic@0.3, ties@0.3, 1 donor, "
            "4 eval batches",
            "baseline": "the same fine-tuning without MergeProbe, same process",
            "plain_seconds": plain,
            "probed_seconds": probed,
            "wall_time_ratio": ratio,
            "budgeted_seconds": budgeted,
            "budgeted_wall_time_ratio": budgeted / plain,
            "budgeted_probes_run": len(budgeted_probe.probe_seconds),
            "budgeted_probes_skipped": budgeted_probe.skipped_for_budget,
            "probe_seconds": probe.probe_seconds,
            "model_bytes": model_bytes,
            "probe_held_bytes": held,
            "probe_held_over_model": held / model_bytes,
            "probe_peak_rss_extra_bytes": max(probe.rss_extra),
            "table": table,
        },
    )
    print(table)
    print(
        f"HEADLINE probe: {ratio:.3f}x the training wall time without it (every epoch); "
        f"{budgeted / plain:.3f}x with max_overhead=0.05; holds {held / model_bytes:.2f}x the model"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
