"""Untrusted inputs and killed writers: the same-base test, baseless merges, temp files of dead writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import yaml
from _helpers import tiny_llama

from lightning_mergeguard.cli.merge import main as merge_main
from lightning_mergeguard.errors import ForeignBaseError
from lightning_mergeguard.io import clean_orphaned_temps
from lightning_mergeguard.merging import merge
from lightning_mergeguard.merging.base_check import BaseCheckWarning, check_same_base, compare, tensors_to_compare


def _far_finetune(state, seed: int, rel: float):
    """Each matrix moved by ``rel`` times its own norm in a random direction (a heavy fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        d = torch.randn(v.shape, generator=g)
        out[k] = v + rel * v.norm() / d.norm() * d if v.is_floating_point() and v.dim() >= 2 else v.clone()
    return out


def _verdict(donor, base):
    names = tensors_to_compare({k: (tuple(v.shape), v.dtype) for k, v in base.items()})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            check_same_base([compare(k, donor[k], base[k]) for k in names], donor="d")
        except ForeignBaseError:
            return "refused"
    return "warned" if any(issubclass(w.category, BaseCheckWarning) for w in seen) else "accepted"


@pytest.mark.parametrize("rel", [0.01, 0.3, 1.0, 1.93, 3.0])
def test_far_fine_tunes_pass_and_foreign_models_are_refused(rel):
    """The distance test refused a fine-tune 1.93x away and took a foreign init 1.61x away; cosines tell them apart."""
    base = tiny_llama(seed=0).state_dict()
    assert _verdict(_far_finetune(base, seed=1, rel=rel), base) == "accepted"
    for seed in (1, 2, 3):
        assert _verdict(tiny_llama(seed=seed).state_dict(), base) == "refused"


def test_a_fine_tune_too_far_to_tell_is_warned_about_not_refused():
    """Moved 8x its norm, a 128x128 matrix keeps cosine ~0.12: related beyond chance (z ~ 16), but far."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(128, 128, generator=g) for i in range(5)}
    assert _verdict(_far_finetune(base, seed=1, rel=8.0), base) == "warned"
    # the same cosines on 16x16 matrices are what chance gives (z ~ 2): refused
    small = {f"w{i}": torch.randn(16, 16, generator=g) for i in range(5)}
    assert _verdict(_far_finetune(small, seed=1, rel=8.0), small) == "refused"


def _save(state, path):
    from _helpers import TINY_LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.load_state_dict(state)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def far_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("far")
    base = tiny_llama(seed=0).state_dict()
    return {
        "base": _save(base, root / "base"),
        "ft1": _save(_far_finetune(base, 1, 1.93), root / "ft1"),
        "ft2": _save(_far_finetune(base, 2, 1.5), root / "ft2"),
        "foreign": _save(tiny_llama(seed=5).state_dict(), root / "foreign"),
    }


def _write(cfg, path):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_mergekit_configs_with_far_fine_tunes_and_no_base_run(far_models, tmp_path, capsys):
    """A drop-in must run the configs mergekit runs: far fine-tunes with a base, and merges that have no base."""
    m = far_models
    ties = {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [{"model": m[k], "parameters": {"weight": 0.5, "density": 0.5}} for k in ("ft1", "ft2")],
    }
    assert merge_main([_write(ties, tmp_path / "ties.yml"), str(tmp_path / "o1"), "--no-progress"]) == 0
    for method in ("linear", "karcher", "nuslerp", "multislerp"):
        weight = {} if method == "karcher" else {"parameters": {"weight": 0.5}}
        cfg = {"merge_method": method, "models": [{"model": m[k], **weight} for k in ("ft1", "ft2")]}
        out = tmp_path / f"{method}.safetensors"
        assert merge_main([_write(cfg, tmp_path / f"{method}.yml"), str(out), "--no-progress"]) == 0, (
            capsys.readouterr().err
        )
    # a baseless merge with an unrelated model runs as mergekit's does, with a warning
    cfg = {
        "merge_method": "linear",
        "models": [{"model": m[k], "parameters": {"weight": 0.5}} for k in ("ft1", "foreign")],
    }
    with pytest.warns(BaseCheckWarning, match="does not look like a fine-tune"):
        merge(cfg, check_base=True)
    # with a base, a foreign donor is refused and the refusal names the switch
    ties["models"][1]["model"] = m["foreign"]
    assert merge_main([_write(ties, tmp_path / "bad.yml"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "is not a fine-tune of base" in err and "--no-base-check" in err
    assert merge_main([str(tmp_path / "bad.yml"), str(tmp_path / "o3"), "--no-base-check", "--no-progress"]) == 0


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from lightning_mergeguard.io import atomic_directory, atomic_open
    target, kind = sys.argv[1], sys.argv[2]
    if kind == "file":
        with atomic_open(target, "wb") as f:
            f.write(b"partial"); f.flush(); print("writing", flush=True); time.sleep(60)
    else:
        with atomic_directory(target) as d:
            (d / "model.safetensors").write_bytes(b"partial"); print("writing", flush=True); time.sleep(60)
    """
)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_temps_of_a_writer_killed_with_sigkill_are_cleaned_by_the_next_writer(tmp_path, kind):
    """A merge into one .safetensors file killed with SIGKILL left its temp file for good; so could protect's dir."""
    target = tmp_path / ("merged.safetensors" if kind == "file" else "model")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{target.name}.{proc.pid}.")
    assert clean_orphaned_temps(tmp_path) == []  # a live writer's temp is kept
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if kind == "file":
        merge({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]},
              {"a": {"w": torch.ones(2)}}, out=target)  # fmt: skip
        assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]
    else:
        from lightning_mergeguard.io import atomic_directory

        with atomic_directory(target) as d:
            (d / "model.safetensors").write_bytes(b"done")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
        assert (target / "model.safetensors").read_bytes() == b"done"


def test_a_directory_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """Killed between its two renames, a replacing writer leaves the old model only under .NAME.PID.old."""
    dead = 2**22 + 12345  # no such process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    aside = tmp_path / f".model.{dead}.old"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"the old model")
    assert clean_orphaned_temps(tmp_path) == [aside]
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"the old model"
