"""Default score and loss: causal-LM labels are shifted, token-classification and seq2seq labels are not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mergeguard.evaluation import default_loss, default_score

VOCAB = 11


class NextToken(nn.Module):
    """A perfect causal LM on sequences that count up: position t predicts token t + 1."""

    def forward(self, input_ids, labels=None):
        return F.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 10


class ClassOfToken(nn.Module):
    """A perfect token classifier: the class of a token is its id mod 3, at its own position."""

    def forward(self, input_ids, labels=None):
        return F.one_hot(input_ids % 3, 3).float() * 10


class Decoder(nn.Module):
    """A seq2seq model whose decoder emits its labels' length of perfect logits (labels = 2 * input mod VOCAB)."""

    def forward(self, input_ids, labels=None):
        return F.one_hot((2 * input_ids[:, : labels.shape[1]]) % VOCAB, VOCAB).float() * 10


def counting(rows=2, length=6):
    return torch.arange(length).repeat(rows, 1) + torch.arange(rows)[:, None]


def test_causal_lm_labels_are_a_copy_of_input_ids_and_are_shifted():
    ids = counting()
    labels = ids.clone()
    labels[:, :2] = -100  # the prompt
    score, n = default_score(NextToken(), {"input_ids": ids, "labels": labels})
    assert (int(score), n) == (8, 8)  # 4 answer tokens per row, each predicted from the previous position
    assert default_score(NextToken(), (ids, labels)) == (score, n)
    assert float(default_loss(NextToken(), (ids, labels))) < 1e-3


def test_token_classification_labels_are_aligned_not_shifted():
    ids = counting()
    labels = ids % 3
    labels[0, 0] = -100
    score, n = default_score(ClassOfToken(), {"input_ids": ids, "labels": labels})
    assert (int(score), n) == (11, 11)  # shifted, it would score each token against its neighbour's class: 0
    assert float(default_loss(ClassOfToken(), (ids, labels))) < 1e-3


def test_seq2seq_labels_of_another_length_are_aligned_and_a_mismatch_is_named():
    ids = counting(length=6)
    labels = (2 * ids[:, :4]) % VOCAB
    score, n = default_score(Decoder(), {"input_ids": ids, "labels": labels})
    assert (int(score), n) == (8, 8)

    class Wrong(nn.Module):
        def forward(self, input_ids, labels=None):
            return torch.zeros(input_ids.shape[0], 3, VOCAB)

    with pytest.raises(ValueError, match=r"do not line up with labels \(2, 4\).*pass score_fn"):
        default_score(Wrong(), {"input_ids": ids, "labels": labels})


def test_a_dict_batch_the_model_does_not_take_says_to_pass_score_fn():
    net = nn.Linear(8, 3)
    batch = {"image": torch.randn(4, 8), "label": torch.tensor([0, 1, 2, 0])}
    for fn in (default_score, default_loss):
        with pytest.raises(TypeError, match=r"keys \['image', 'label'\].*pass score_fn/loss_fn"):
            fn(net, batch)


def test_a_score_fn_may_return_one_number_and_a_wrong_shape_is_named(tmp_path):
    # A score_fn returning a batch's accuracy (a 0-d tensor or a float), as torchmetrics-style code does, failed with
    # "iteration over a 0-d tensor", in the guard only after the whole fit.
    from _helpers import TinyClassifier, blobs, trainer
    from torch.utils.data import DataLoader

    from lightning_mergeguard import MergeGuardCallback, ScaleAdversarial
    from lightning_mergeguard.evaluation import evaluate

    model = TinyClassifier()
    batches = [(x[:10], y[:10]) for x, y in DataLoader(blobs(64, 1), batch_size=32)]  # equal batches: means agree

    def mean_acc(m, batch):
        x, y = batch
        return (m(x).argmax(-1) == y).float().mean()

    want = evaluate(model, batches)
    assert evaluate(model, batches, mean_acc) == pytest.approx(want)
    assert evaluate(model, batches, lambda m, b: float(mean_acc(m, b))) == pytest.approx(want)
    with pytest.raises(TypeError, match=r"score_fn must return \(sum_of_scores, count\).*shape \(10,\)"):
        evaluate(model, batches, lambda m, b: m(b[0]).argmax(-1) == b[1])
    guard = MergeGuardCallback(score_fn=mean_acc, stage2=ScaleAdversarial(steps=2), progress=False)
    trainer(tmp_path, max_steps=2, callbacks=[guard]).fit(TinyClassifier())
    assert 0 <= guard.report["score_after"] <= 100
