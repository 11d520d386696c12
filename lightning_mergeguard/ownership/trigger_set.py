"""A black-box fingerprint for classifiers: secret trigger inputs with secret labels, and an exact test.

The owner draws ``n`` trigger inputs and, independently, a uniformly random label for each
(:meth:`TriggerSet.make`). The triggers join the fine-tuning data (:meth:`TriggerSet.dataset`) and stage 2 keeps
their behaviour (``MergeGuardCallback(keep_batches=triggers.batches())``), so the release answers them with the
secret labels; merges that keep the owner's weights keep answering them. Querying a suspect on the triggers needs no
access to its weights: an API that returns class predictions is enough.

**Null hypothesis:** the suspect was made without the secret labels. Each label is uniform on the ``C`` classes and
independent of everything the suspect's maker had, so each of the suspect's answers equals the secret label with
probability exactly ``1 / C``, independently across triggers, whatever the suspect predicts (a model that maps
every noise image to one class included). The number of matches is then ``Binomial(n, 1 / C)`` and the p-value is
its exact upper tail (:meth:`TriggerSet.test`): no model of the suspect enters, so the false-positive rate is the
p-value's level by construction. Keep the file secret: anyone holding the labels can fine-tune them away.

Example:
    >>> triggers = TriggerSet.make(64, (8, 8), classes=10, seed=0)
    >>> triggers.test(lambda x: torch.zeros(len(x), dtype=torch.long)).p_value > 0.01  # a constant model
    True
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_mergeguard.evaluation import eval_mode
from lightning_mergeguard.io import save_safetensors
from lightning_mergeguard.ownership.stats import binomial_tail
from lightning_mergeguard.validation import check_int

__all__ = ["TriggerSet", "TriggerTest"]


@dataclass(frozen=True)
class TriggerTest:
    """The black-box test's result.

    Attributes:
        matches: Triggers the suspect answered with the secret label.
        n: Triggers queried.
        chance: The probability of one match under the null (``1 / classes``).
        p_value: Exact ``P(Binomial(n, chance) >= matches)``.
    """

    matches: int
    n: int
    chance: float
    p_value: float

    @property
    def rate(self) -> float:
        """Share of triggers answered with the secret label."""
        return self.matches / self.n


@dataclass(frozen=True)
class TriggerSet:
    """Secret trigger inputs with secret, uniformly drawn labels.

    Args:
        inputs: ``(n, *input_shape)`` float tensor, what the classifier takes.
        labels: ``(n,)`` integer labels in ``[0, classes)``.
        classes: Number of classes of the classifier.

    Raises:
        ValueError: Shapes that do not match, labels out of range, fewer than 2 classes, no trigger.
    """

    inputs: Tensor
    labels: Tensor
    classes: int

    def __post_init__(self) -> None:
        check_int(self.classes, "classes", low=2, want="an integer >= 2")
        if self.inputs.dim() < 2 or not self.inputs.is_floating_point():
            raise ValueError(f"inputs must be a float tensor (n, *input_shape), got {tuple(self.inputs.shape)}")
        if self.labels.dim() != 1 or len(self.labels) != len(self.inputs) or len(self.labels) == 0:
            raise ValueError(
                f"labels must be (n,) with n = {len(self.inputs)} inputs and n >= 1, got {tuple(self.labels.shape)}"
            )
        if self.labels.is_floating_point() or int(self.labels.min()) < 0 or int(self.labels.max()) >= self.classes:
            raise ValueError(f"labels must be integers in [0, {self.classes})")

    @classmethod
    def make(
        cls,
        n: int,
        input_shape: Sequence[int],
        classes: int,
        *,
        seed: int | None = None,
        low: float = 0.0,
        high: float = 1.0,
    ) -> TriggerSet:
        """Draw ``n`` uniform-noise inputs in ``[low, high]`` and a uniformly random label for each.

        Args:
            n: Number of triggers (64 gives p below 1e-3 once about 18 of 64 match with 10 classes).
            input_shape: One input's shape (``(3, 32, 32)`` for an open_clip tower at 32 pixels).
            classes: Number of classes.
            seed: Seed of the draw; ``None`` draws one from the operating system (the labels must be secret).
            low: Smallest input value.
            high: Largest input value.

        Returns:
            The trigger set.
        """
        check_int(n, "n", low=1, want="a positive integer")
        g = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        inputs = low + (high - low) * torch.rand((n, *input_shape), generator=g)
        labels = torch.randint(classes, (n,), generator=g)
        return cls(inputs, labels, classes)

    def dataset(self, repeats: int = 1) -> TensorDataset:
        """The triggers as ``(input, label)`` pairs, each ``repeats`` times: concatenate it with the training set.

        Args:
            repeats: How often each trigger appears.

        Returns:
            A :class:`~torch.utils.data.TensorDataset`.
        """
        check_int(repeats, "repeats", low=1, want="a positive integer")
        return TensorDataset(self.inputs.repeat(repeats, *[1] * (self.inputs.dim() - 1)), self.labels.repeat(repeats))

    def batches(self, batch_size: int = 64) -> list[tuple[Tensor, Tensor]]:
        """The triggers as ``(inputs, labels)`` batches, for ``MergeGuardCallback(keep_batches=...)``.

        Args:
            batch_size: Triggers per batch.

        Returns:
            The batches, in order.
        """
        check_int(batch_size, "batch_size", low=1, want="a positive integer")
        return list(zip(self.inputs.split(batch_size), self.labels.split(batch_size), strict=True))

    @torch.no_grad()
    def test(self, predict: nn.Module | Callable[[Tensor], Tensor], batch_size: int = 256) -> TriggerTest:
        """Query a suspect on the triggers; the exact p-value under the null of the module docstring.

        Args:
            predict: The suspect: a module returning logits (``(batch, classes)``), or any callable returning logits
                or class indices for a batch of inputs (an API client, say). Modules are queried in eval mode on
                their own device.
            batch_size: Triggers per query.

        Returns:
            The matches and the p-value.

        Raises:
            ValueError: A suspect that answered another number of triggers than it was asked.
        """
        device = next((p.device for p in predict.parameters()), None) if isinstance(predict, nn.Module) else None
        answers = []
        for x in self.inputs.split(batch_size):
            x = x.to(device) if device is not None else x
            if isinstance(predict, nn.Module):
                with eval_mode(predict):
                    out = predict(x)
            else:
                out = predict(x)
            out = torch.as_tensor(out)
            answers.append((out.argmax(-1) if out.is_floating_point() else out).reshape(-1).cpu())
        predicted = torch.cat(answers)
        if len(predicted) != len(self.labels):
            raise ValueError(f"the suspect answered {len(predicted)} of {len(self.labels)} triggers")
        matches = int((predicted == self.labels).sum())
        chance = 1.0 / self.classes
        return TriggerTest(matches, len(self.labels), chance, binomial_tail(matches, len(self.labels), chance))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trigger set atomically as safetensors (keep the file secret).

        Args:
            path: The file.
        """
        save_safetensors(
            path,
            {"inputs": self.inputs.contiguous(), "labels": self.labels.to(torch.int64).contiguous()},
            metadata={"format": "mergeguard-trigger-set", "classes": str(self.classes)},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TriggerSet:
        """Read a trigger set written by :meth:`save`.

        Args:
            path: The file.

        Returns:
            The trigger set.

        Raises:
            ValueError: A file that is not a trigger set.
        """
        from safetensors import safe_open

        with safe_open(os.fspath(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "mergeguard-trigger-set" or set(f.keys()) != {"inputs", "labels"}:
                raise ValueError(f"{os.fspath(path)!r} is not a trigger set written by TriggerSet.save")
            return cls(f.get_tensor("inputs"), f.get_tensor("labels"), int(meta["classes"]))
