"""Guard + probe on a tiny classifier, sharded with FSDP2 over N CPU processes (gloo) or on one process.

Run as a script (Lightning's launcher re-runs it for rank 1): ``python tests/fsdp_worker.py OUT --devices 2``.
Batches are not shuffled and each rank gets ``64 / devices`` rows, so a 2-process run sees the same 64-row batches as
one process (a DistributedSampler interleaves rows; the mean of two equal halves is the mean of the whole). Rank zero
writes ``OUT/result.pt``: the final weights gathered, the guard's report, the probe's results, the stage-1 term.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import TinyClassifier, blobs

from lightning_mergeguard import Donors, MergeGuardCallback, MergeProbe, ProbeSchedule, ScaleAdversarial
from lightning_mergeguard.models.trainer import quiet_trainer


class ShardedTinyClassifier(TinyClassifier):
    """TinyClassifier whose Linear layers and root are wrapped by ``fully_shard`` when a device mesh exists."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        for m in self.modules():
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=dp)
        fully_shard(self, mesh=dp)

    def _loader(self, data):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self):
        return self._loader(blobs(256, 0))

    def val_dataloader(self):
        return self._loader(blobs(128, 1))


class Record(pl.Callback):
    """After the guard and the probe: gather the final weights (every rank) and keep what rank zero writes."""

    def __init__(self, out: Path, name: str = "result.pt", checkpoint_after_first_epoch: str | None = None) -> None:
        self.out, self.name, self.mid = out, name, checkpoint_after_first_epoch
        self.terms: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if self.mid and trainer.current_epoch == 0:  # every rank: a distributed checkpoint is a collective
            trainer.save_checkpoint(self.mid)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0 and __import__("os").environ.get("FSDP_DEBUG"):
            g = pl_module.head.bias.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            print("GRAD", trainer.global_rank, g.tolist())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and __import__("os").environ.get("FSDP_DEBUG"):
            print("BATCH", trainer.global_rank, batch[1][:6].tolist(), batch[0].shape)

    def on_train_batch_end(self, trainer, pl_module, *args):
        term = trainer.callback_metrics.get("mergeguard/l2_term")
        if term is not None:
            self.terms.append(float(term))

    def on_train_end(self, trainer, pl_module):
        weights = {}
        for k, v in pl_module.state_dict().items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            weights[k] = v.detach().cpu().clone()
        guard = next(c for c in trainer.callbacks if isinstance(c, MergeGuardCallback))
        probe = next(c for c in trainer.callbacks if isinstance(c, MergeProbe))
        if trainer.is_global_zero:
            torch.save(
                {
                    "weights": weights,
                    "report": guard.report,
                    "probe": probe.results,
                    "terms": self.terms,
                    "peak_rss_kib": _peak_rss_kib(),
                },
                self.out / self.name,
            )


def _peak_rss_kib() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def fit(args: argparse.Namespace, record: Record, ckpt_path: str | None = None) -> None:
    """One fit from the same base, donor and data; a fresh model, guard, probe and trainer."""
    pl.seed_everything(0)
    donor = TinyClassifier()  # another fine-tune of the same base: a small move away from it
    base = TinyClassifier()
    base.load_state_dict(donor.state_dict())
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in donor.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = ShardedTinyClassifier(batch_size=64 // args.devices)
    model.load_state_dict(base.state_dict())
    reference = None
    if args.reference_file:  # theta_pre from a file: each rank keeps its own rows of it
        from safetensors.torch import save_file

        reference = str(args.out / f"base{os.environ.get('LOCAL_RANK', '0')}.safetensors")
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, reference)
    guard = MergeGuardCallback(
        reference=reference,
        alpha=args.alpha,
        stage2=ScaleAdversarial(steps=6, lr=args.stage2_lr, checks=3, drop_density=args.drop_density),
        tolerance=5.0,
        progress=False,
        save_path=args.save,
    )
    probe = MergeProbe(
        methods=args.methods,
        coefficients=[0.5],
        eval_dataloaders=DataLoader(blobs(128, 1), batch_size=64),  # the same batches on every rank (the probe
        eval_batches=2,  # gives each rank every world-th batch and sums the scores)
        strict=True,
        progress=False,
        donors=Donors({"d": {k: v.clone() for k, v in donor.state_dict().items()}}, check_base=False),
        schedule=ProbeSchedule(max_overhead=None),  # every epoch, on every rank alike
    )
    strategy = (
        ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1) if args.devices > 1 else "auto"
    )
    t = quiet_trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        limit_train_batches=4,
        log_every_n_steps=1,
        use_distributed_sampler=False,  # the module's loaders split rows in order (see _loader)
        default_root_dir=str(args.out),
        callbacks=[guard, probe, record],
    )
    t.fit(model, ckpt_path=ckpt_path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl; make gpu-check)")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--drop-density", type=float, default=None)
    parser.add_argument("--stage2-lr", type=float, default=0.02)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties"])
    parser.add_argument("--resume", action="store_true", help="also rerun from a checkpoint taken after epoch 1")
    parser.add_argument("--save", help="the guard's save_path")
    parser.add_argument("--reference-file", action="store_true", help="theta_pre from a safetensors file")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mid = str(args.out / "mid.ckpt") if args.resume else None
    fit(args, Record(args.out, checkpoint_after_first_epoch=mid))
    if args.resume:  # the same fit again, resumed from the checkpoint taken after its first epoch
        fit(args, Record(args.out, "resumed.pt"), ckpt_path=mid)
    if torch.distributed.is_initialized():
        # Tear gloo down before the interpreter exits: left to exit-time destructors, a rank was seen aborting
        # ("terminate called without an active exception", exit -6) after everything had been written.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
