"""What both callbacks cost where users train: a ~220M Llama and an open_clip ViT-B-32 on a GPU, bf16-mixed.

    python benchmarks/gpu_overhead.py                     # --device auto --size full: meant for a GPU
    python benchmarks/gpu_overhead.py --size tiny --device cpu --steps 6   # a smoke run of the same code

Each model (random init from its config: no hub here) is fine-tuned on random data, and every figure is a ratio
against plain fine-tuning of the same model measured in the same run (the baseline):

- stage 1 (MergeGuard, stage 2 off): median step time and peak accelerator memory with the reference in the
  parameters' dtype, in bf16 (``reference_dtype``), and offloaded to the CPU (``reference_device``);
- stage 2: seconds and validation passes of the default scale-adversarial stage 2;
- MergeProbe at its default cadence (once per epoch, task arithmetic at 0.3, two donors held on the CPU): seconds
  per probe and the training wall-time ratio.

Writes benchmarks/results/gpu_overhead_<device>.json (the device is named in it) and prints the headline ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from _common import accelerator, add_device_argument, markdown_table, resolve_device, write_results
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from lightning_mergeguard import MergeGuardCallback, MergeProbe, ProbeSchedule, ReferenceWeights, ScaleAdversarial
from lightning_mergeguard.models.trainer import quiet_trainer

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "llama": dict(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=16,
            tie_word_embeddings=False,
        ),
        "llama_batch": (8, 256),
        "vit": "ViT-B-32",
        "vit_batch": (32, 224),
    },
    "tiny": {
        "llama": dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
        "llama_batch": (4, 32),
        "vit": "tiny",
        "vit_batch": (8, 32),
    },
}


class StepTimer(pl.Callback):
    """Wall time of each training step (synchronised on CUDA)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


def llama_setting(size: dict[str, Any], steps: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_mergeguard.models.causal_lm import CausalLMModule

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**size["llama"]))
    b, t = size["llama_batch"]
    ids = torch.randint(0, size["llama"]["vocab_size"], (b * steps, t))
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    val = rows[: 2 * b]

    def make():
        return CausalLMModule(copy.deepcopy(model), lr=1e-4)

    return make, DataLoader(rows, batch_size=b), DataLoader(val, batch_size=b), model.state_dict()


def vit_setting(size: dict[str, Any], steps: int):
    from lightning_mergeguard.models.open_clip import ClipImageClassifier, build_open_clip

    torch.manual_seed(0)
    clip = build_open_clip(size["vit"])
    embed = clip.visual.output_dim if hasattr(clip.visual, "output_dim") else clip.text_projection.shape[1]
    module = ClipImageClassifier(clip.visual, embed, num_classes=10, lr=1e-4)
    b, res = size["vit_batch"]
    x, y = torch.randn(b * steps, 3, res, res), torch.randint(0, 10, (b * steps,))
    train = DataLoader(TensorDataset(x, y), batch_size=b)
    val = DataLoader(TensorDataset(x[: 2 * b], y[: 2 * b]), batch_size=b)
    return (lambda: copy.deepcopy(module)), train, val, module.state_dict()


def fake_donors(state: dict[str, torch.Tensor], n: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """Stand-ins for fine-tunes of the same base: the base plus small noise, on the CPU."""
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        out[f"donor{i}"] = {
            k: v + 1e-3 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=g)
            if v.is_floating_point()
            else v
            for k, v in state.items()
        }
    return out


def fit(make, train, val, device: torch.device, callbacks: list, precision: str) -> dict[str, Any]:
    timer = StepTimer()
    pl.seed_everything(0, verbose=False)
    module = make()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = quiet_trainer(
        max_epochs=1,
        accelerator=accelerator(device),
        precision=precision,
        num_sanity_val_steps=0,
        limit_val_batches=0 if not any(isinstance(c, MergeGuardCallback) for c in callbacks) else 1,
        callbacks=[*callbacks, timer],
    )
    start = time.perf_counter()
    trainer.fit(module, train, val)
    wall = time.perf_counter() - start
    return {
        "step_s": statistics.median(timer.times[2:] or timer.times),
        "wall_s": wall,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (one epoch)")
    parser.add_argument("--models", nargs="+", choices=["llama", "vit"], default=["llama", "vit"])
    parser.add_argument("--stage2-steps", type=int, default=30)
    parser.add_argument("--out", default=None, help="results name (default: gpu_overhead_<device type>)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    size = SIZES[args.size]
    results: dict[str, Any] = {}
    rows = []
    bar = tqdm(total=7 * len(args.models), desc="gpu_overhead")
    for name in args.models:
        make, train, val, state = (llama_setting if name == "llama" else vit_setting)(size, args.steps)
        n_params = sum(v.numel() for v in state.values() if v.is_floating_point())
        fit(make, train, val, device, [], precision)  # warm-up (lazy initialisation, allocator, kernels): not used
        bar.update()
        plain = fit(make, train, val, device, [], precision)
        bar.update()
        runs = {}
        for label, kwargs in [
            ("stage 1, reference as parameters", {}),
            ("stage 1, bf16 reference", {"reference": ReferenceWeights(dtype="bfloat16")}),
            ("stage 1, reference on the CPU", {"reference": ReferenceWeights(device="cpu")}),
        ]:
            runs[label] = fit(make, train, val, device, [MergeGuardCallback(stage2="none", **kwargs)], precision)
            bar.update()
        guard = MergeGuardCallback(stage2=ScaleAdversarial(steps=args.stage2_steps), eval_batches=2, progress=False)
        fit(make, train, val, device, [guard], precision)
        bar.update()
        probe = MergeProbe(
            donors=fake_donors(state),
            eval_dataloaders=val,
            progress=False,
            schedule=ProbeSchedule(on_train_end=False, max_overhead=None),
        )
        probed = fit(make, train, val, device, [probe], precision)
        bar.update()
        probe_s = [r["mergeprobe/seconds"] for r in probe.results]
        entry = {
            "parameters": n_params,
            "plain": plain,
            "stage1": {
                label: {
                    **r,
                    "step_ratio": ratio(r["step_s"], plain["step_s"]),
                    "memory_ratio": ratio(r["peak_gib"], plain["peak_gib"]),
                }
                for label, r in runs.items()
            },
            "stage2": {
                "seconds": guard.report["seconds"],
                "validation_passes": guard.report["validation_passes"],
                "steps": args.stage2_steps,
            },
            "probe": {
                "seconds_per_probe": statistics.median(probe_s) if probe_s else None,
                "probes": len(probe_s),
                "wall_ratio": ratio(probed["wall_s"], plain["wall_s"]),
                "donor_device": "cpu",
            },
        }
        results[name] = entry
        for label, r in entry["stage1"].items():
            rows.append([name, label, r["step_ratio"], r["memory_ratio"]])
        rows.append(
            [name, f"stage 2 ({entry['stage2']['validation_passes']} validation passes)", guard.report["seconds"], None]
        )
        rows.append([name, "probe: training wall ratio at the default cadence", entry["probe"]["wall_ratio"], None])
    bar.close()
    table = markdown_table(
        ["model", "what", "ratio to plain fine-tuning (stage 2: seconds)", "peak memory ratio"], rows
    )
    print(table)
    path = write_results(
        args.out or f"gpu_overhead_{device.type}",
        {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": precision,
            "size": args.size,
            "steps": args.steps,
            "models": results,
            "table": table,
        },
    )
    for name, entry in results.items():
        s1 = entry["stage1"]["stage 1, reference as parameters"]
        print(
            f"headline {name}: stage-1 step {s1['step_ratio']:.3f}x plain fine-tuning (baseline), "
            f"probe wall {entry['probe']['wall_ratio']:.3f}x, stage 2 {entry['stage2']['validation_passes']} "
            f"validation passes -> {path}"
        )


if __name__ == "__main__":
    main()
