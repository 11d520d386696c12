"""What the tests build on: small LightningModules and callbacks (module-level, so they pickle for ddp_spawn),
the tiny Llama factory, perturbed fine-tunes, a byte-level tokenizer and a tiny causal LM trained on rows.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mergeguard.models.causal_lm import LMTaskDataset
from lightning_mergeguard.models.trainer import quiet_trainer


def blobs(n: int = 256, seed: int = 0, dim: int = 8, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


class TinyClassifier(pl.LightningModule):
    def __init__(self, dim: int = 8, width: int = 16, classes: int = 3, lr: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, classes)
        self.lr = lr

    def forward(self, x):
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(blobs(256, 0), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(blobs(128, 1), batch_size=64)


class SaveWeightsOnTrainEnd(pl.Callback):
    """Writes each rank's final weights to ``{directory}/rank{r}.pt`` (after the callbacks before it ran)."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            f"{self.directory}/rank{trainer.global_rank}.pt",
        )


class DestroyProcessGroupAtTeardown(pl.Callback):
    """Tear gloo down at the end of a multi-process fit, before the worker process exits.

    Left to the interpreter's exit-time destructors, a rank was seen aborting after a finished fit ("terminate called
    without an active exception", SIGABRT), failing a test whose results were all written.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(max_epochs=2, accelerator="cpu", default_root_dir=str(tmp_path), deterministic=True)
    defaults.update(kwargs)
    if int(defaults.get("devices", 1) or 1) > 1:
        defaults["callbacks"] = [*(defaults.get("callbacks") or []), DestroyProcessGroupAtTeardown()]
    return quiet_trainer(**defaults)


def fit_ddp_ranks(tmp_path, module: pl.LightningModule, callback: pl.Callback, *loaders) -> list[dict]:
    """Fit ``module`` with ``callback`` on two ``ddp_spawn`` CPU processes; each rank's final weights."""
    save = SaveWeightsOnTrainEnd(str(tmp_path))
    t = trainer(tmp_path, max_epochs=1, strategy="ddp_spawn", devices=2, callbacks=[callback, save])
    t.fit(module, *loaders)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


class SaveWeightsOnFitEnd(SaveWeightsOnTrainEnd):
    """Like :class:`SaveWeightsOnTrainEnd`, in ``on_fit_end``: also when Lightning skips a finished training loop."""

    def on_train_end(self, trainer, pl_module):
        pass

    def on_fit_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)


# ------------------------------------------------------------------ tiny language models and their data
TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def tiny_llama(seed: int = 0, **overrides):
    """The tests' tiny Llama (``TINY_LLAMA``, any field overridden), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))


def perturbed_state_dict(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def accelerator(device: torch.device) -> str:
    """The Lightning accelerator name for a torch device."""
    return "gpu" if device.type == "cuda" else "cpu"


def make_byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + EOS), so no files are needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_lm(seed: int = 0, vocab: int = 257):
    """A tiny Llama over the byte tokenizer's vocabulary, wide enough to learn rows (fingerprints, watermarks)."""
    return tiny_llama(
        seed, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256,
    )  # fmt: skip


def train_rows(model, tok, rows, steps, lr=3e-3, after_step=None):
    data = LMTaskDataset(tok, rows, max_length=max(len(tok(p + a).input_ids) for p, a in rows) + 1)
    batch = {k: torch.stack([r[k] for r in data.rows]) for k in data.rows[0]}
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        if after_step is not None:
            after_step(model)
    return model
