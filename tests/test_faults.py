"""Bad inputs and file-system faults: each ends in one clear error naming the problem, and no stale weights are read.

Fault injection: read-only and full disks through a patched writer (the suite may run as root, which ignores file
permissions), concurrent writers into one directory, and a writer killed with SIGKILL mid-merge.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import perturbed_state_dict, tiny_llama
from safetensors.torch import load_file, save_file

from lightning_mergeguard.cli.merge import main
from lightning_mergeguard.errors import (
    ConfigError,
    ForeignBaseError,
    IncompatibleModelsError,
    MergeGuardError,
    NonFiniteError,
    OutputError,
    WeightsFileError,
)
from lightning_mergeguard.io import StreamingSafetensorsWriter
from lightning_mergeguard.merging import merge
from lightning_mergeguard.merging.sources import open_source


def ta_config(base, models, lam=1.0):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "parameters": {"lambda": lam},
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
    }


def write_cfg(tmp_path, cfg) -> Path:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([*map(str, args), "--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# ----------------------------------------------------------------------------------- stale weights in the output
def test_merge_into_a_sharded_model_directory_leaves_no_stale_weights(llama_dirs, tmp_path):
    out = tmp_path / "out"
    old = tiny_llama(seed=7)  # some other model, saved sharded: an index and two shards
    old.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    cfg = ta_config(llama_dirs["base"], [llama_dirs["a"], llama_dirs["b"]])
    merge(cfg, out=out)
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    want = merge(cfg)
    ours = open_source(out).state_dict()
    assert all(torch.equal(ours[k], want[k]) for k in want)
    from transformers import LlamaForCausalLM

    theirs = LlamaForCausalLM.from_pretrained(out).state_dict()  # transformers reads the same weights
    assert all(torch.equal(theirs[k], want[k]) for k in want)


def test_refuse_mode_keeps_an_existing_model(llama_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = ta_config(llama_dirs["base"], [llama_dirs["a"]])
    merge(cfg, out=out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match=r"already holds model weights \(model.safetensors\)"):
        merge(ta_config(llama_dirs["base"], [llama_dirs["b"]]), out=out, existing="refuse")
    code, err = run_cli([write_cfg(tmp_path, cfg), out, "--no-overwrite"], capsys)
    assert code == 2 and "already holds model weights" in err
    assert (out / "model.safetensors").read_bytes() == before


def test_loader_prefers_what_transformers_reads(tmp_path):
    """model.safetensors wins over a leftover index, as in transformers; several unindexed files are refused."""
    d = tmp_path / "m"
    d.mkdir()
    save_file({"w": torch.ones(2)}, d / "model.safetensors")
    save_file({"w": torch.zeros(2)}, d / "old-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "old-00001.safetensors"}}))
    assert torch.equal(open_source(d).get("w"), torch.ones(2))
    (d / "model.safetensors").unlink()
    assert torch.equal(open_source(d).get("w"), torch.zeros(2))
    (d / "model.safetensors.index.json").unlink()
    save_file({"w": torch.ones(2)}, d / "other.safetensors")
    with pytest.raises(FileNotFoundError, match=r"several \*\.safetensors files and no index"):
        open_source(d)


# ------------------------------------------------------------------------------------------------- input files
def test_float8_and_unsigned_safetensors_dtypes_merge(tmp_path):
    def model(shift):
        return {
            "w8": (torch.tensor([1.0, 2.0, -0.5]) + shift).to(torch.float8_e4m3fn),
            "w": torch.tensor([1.0, 2.0]) + shift,
            "ids": torch.tensor([3, 4, 5], dtype=torch.uint16),
        }

    for name, shift in [("base", 0.0), ("a", 0.5), ("b", -0.25)]:
        save_file(model(shift), tmp_path / f"{name}.safetensors")
    cfg = ta_config(tmp_path / "base.safetensors", [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    out = merge(cfg, out=tmp_path / "merged.safetensors", check_base=False)
    got = load_file(out)
    assert got["w8"].dtype == torch.float32  # float8 inputs are merged in the compute dtype
    torch.testing.assert_close(got["w8"], torch.tensor([1.0, 2.0, -0.5]) + 0.125)
    assert got["ids"].dtype == torch.uint16 and got["ids"].tolist() == [3, 4, 5]


def test_a_dtype_torch_lacks_is_named(tmp_path, monkeypatch):
    save_file({"ids": torch.tensor([1, 2], dtype=torch.uint16)}, tmp_path / "m.safetensors")
    import lightning_mergeguard.merging.sources as sources

    monkeypatch.setattr(sources, "_ST_DTYPES", {k: v for k, v in sources._ST_DTYPES.items() if k != "U16"})
    with pytest.raises(WeightsFileError, match=r"m.safetensors: tensor 'ids' has safetensors dtype U16"):
        open_source(tmp_path / "m.safetensors").meta("ids")


def test_legacy_non_zip_bin_loads_with_weights_only(tmp_path):
    d = tmp_path / "legacy"
    d.mkdir()
    torch.save({"w": torch.arange(3.0)}, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(open_source(d).get("w"), torch.arange(3.0))


def test_broken_config_and_index_name_their_file(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"w": torch.ones(2)}, d / "model.safetensors")
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsFileError, match=r"m/config.json: the model config is not valid JSON"):
        open_source(d)
    (d / "config.json").unlink()
    (d / "model.safetensors").rename(d / "shard.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(WeightsFileError, match=r"model.safetensors.index.json: a shard index needs a non-empty"):
        open_source(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(WeightsFileError, match=r"gone.safetensors'\] named in 'weight_map' do not exist"):
        open_source(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(WeightsFileError, match="invalid shard files"):
        open_source(d)


def test_truncated_safetensors_names_the_file(tmp_path, capsys, llama_dirs):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (llama_dirs["a"] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run_cli([write_cfg(tmp_path, ta_config(llama_dirs["base"], [bad])), tmp_path / "out"], capsys)
    assert code == 2 and "bad/model.safetensors" in err
    assert not (tmp_path / "out").exists()  # a directory created for a failed merge is removed


def test_yaml_alias_bomb_is_refused_fast(tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 10)}]")
    lines += ["merge_method: linear", "models: [{model: m, parameters: {weight: *i}}]"]
    path = tmp_path / "bomb.yml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1500
    start = time.perf_counter()
    code, err = run_cli([path, tmp_path / "out"], capsys)
    assert code == 2 and "expands to more than 100000 values" in err
    assert time.perf_counter() - start < 5
    with pytest.raises(ConfigError):
        from lightning_mergeguard.merging import MergeConfig

        MergeConfig.from_yaml(path)


# ------------------------------------------------------------------------------------------------ bad donors
def test_foreign_base_donor_is_refused_before_any_tensor(llama_dirs, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    tiny_llama(seed=5).save_pretrained(foreign)
    cfg = ta_config(llama_dirs["base"], [llama_dirs["a"], foreign])
    with pytest.raises(ForeignBaseError, match="foreign' is not a fine-tune of base"):
        merge(cfg, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    code, err = run_cli([write_cfg(tmp_path, cfg), tmp_path / "out"], capsys)
    assert code == 2 and "is not a fine-tune" in err
    code, _ = run_cli([write_cfg(tmp_path, cfg), tmp_path / "out", "--no-base-check"], capsys)
    assert code == 0


def test_fine_tunes_pass_the_base_check(llama_dirs):
    base = tiny_llama().state_dict()
    far_finetune = perturbed_state_dict(base, seed=4, scale=0.01)  # 0.5x the init scale: an aggressive fine-tune
    cfg = ta_config("base", ["ft"])
    merge(cfg, {"ft": far_finetune}, base)


def test_overflowing_merge_writes_nothing(tmp_path, capsys):
    base = {"w": torch.ones(4)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": torch.full((4,), 1.5)}, tmp_path / "a.safetensors")
    cfg = ta_config(tmp_path / "base.safetensors", [tmp_path / "a.safetensors"], lam=1e39)
    with pytest.raises(NonFiniteError, match=r"the merge produced 4 NaN/Inf value\(s\) in tensor 'w'"):
        merge(cfg, out=tmp_path / "out.safetensors", check_base=False)
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_typed_errors_are_value_errors_too(llama_dirs):
    assert issubclass(IncompatibleModelsError, ValueError) and issubclass(OutputError, OSError)
    bad = {k: v for k, v in tiny_llama().state_dict().items() if "lm_head" not in k}
    with pytest.raises(IncompatibleModelsError, match=r"missing 1 tensor\(s\): 'lm_head.weight'"):
        merge(ta_config("base", ["a"]), {"a": bad}, tiny_llama().state_dict())


# ------------------------------------------------------------------------------------------- output faults
def test_output_path_of_the_wrong_kind(llama_dirs, tmp_path, capsys):
    cfg = write_cfg(tmp_path, ta_config(llama_dirs["base"], [llama_dirs["a"]]))
    (tmp_path / "file").write_text("not a directory")
    code, err = run_cli([cfg, tmp_path / "file"], capsys)
    assert code == 2 and "exists and is not a directory" in err
    (tmp_path / "dir.safetensors").mkdir()
    code, err = run_cli([cfg, tmp_path / "dir.safetensors"], capsys)
    assert code == 2 and "is a directory" in err


def test_an_output_over_one_of_the_inputs_is_refused_and_the_inputs_stay(llama_dirs, tmp_path, capsys):
    # The default replaces a model at OUT: pointed at an input, it would replace the fine-tune or the base the user
    # merged from (a directory's weights are replaced, its other weight files removed as stale).
    models = tmp_path / "models"
    for name in ("base", "a", "b"):
        shutil.copytree(llama_dirs[name], models / name)
    loose = tmp_path / "loose"  # fine-tunes as single files in one folder
    loose.mkdir()
    for name in ("a", "b"):
        shutil.copy(models / name / "model.safetensors", loose / f"{name}.safetensors")
    (models / "link").symlink_to(models / "a", target_is_directory=True)
    before = {p: p.read_bytes() for p in [*models.rglob("*.safetensors"), *loose.iterdir()] if p.is_file()}
    dirs = write_cfg(tmp_path, ta_config(models / "base", [models / "a", models / "b"]))
    for out, who in [
        (models / "a", "a"),
        (models / "a" / ".." / "base", "base"),
        (models / "link", "a"),
        (models / "b" / "model.safetensors", "b"),
    ]:
        code, err = run_cli([dirs, out], capsys)
        assert code == 2 and "an input of this merge" in err and f"{models / who}" in err, (out, err)
    files = tmp_path / "files.yml"
    files.write_text(yaml.safe_dump(ta_config(models / "base", [loose / "a.safetensors", loose / "b.safetensors"])))
    code, err = run_cli([files, loose], capsys)
    assert code == 2 and "a.safetensors" in err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (models / "a").iterdir()) == sorted(p.name for p in llama_dirs["a"].iterdir())
    # Next to the inputs, or in a folder above them, is fine.
    assert run_cli([dirs, models / "merged"], capsys)[0] == 0
    assert run_cli([dirs, models], capsys)[0] == 0
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    ],
    ids=["full-disk", "permission", "read-only"],
)
def test_write_faults_end_in_one_line_and_leave_nothing(llama_dirs, tmp_path, capsys, monkeypatch, fault, message):
    calls = []

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 3:
            raise fault
        return original(self, name, tensor)

    original = StreamingSafetensorsWriter.write
    monkeypatch.setattr(StreamingSafetensorsWriter, "write", failing_write)
    cfg = write_cfg(tmp_path, ta_config(llama_dirs["base"], [llama_dirs["a"]]))
    code, err = run_cli([cfg, tmp_path / "new" / "out"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "new" / "out").exists()
    calls.clear()
    with pytest.raises(OutputError, match=message):
        merge(ta_config(llama_dirs["base"], [llama_dirs["a"]]), out=tmp_path / "x.safetensors")
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*.tmp"))


def test_read_only_output_directory(llama_dirs, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions (the patched-writer test covers the error path)")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, err = run_cli([write_cfg(tmp_path, ta_config(llama_dirs["base"], [llama_dirs["a"]])), out], capsys)
        assert code == 2 and "Permission denied" in err
    finally:
        out.chmod(0o755)


_SLOW_CLI = """
import sys, time
from lightning_mergeguard.io import StreamingSafetensorsWriter
orig = StreamingSafetensorsWriter.write
def slow(self, name, tensor):
    time.sleep(float(sys.argv[1]))
    return orig(self, name, tensor)
StreamingSafetensorsWriter.write = slow
from lightning_mergeguard.cli.merge import main
raise SystemExit(main(sys.argv[2:]))
"""


def test_concurrent_merges_into_one_directory(llama_dirs, tmp_path):
    out = tmp_path / "out"
    cfgs = [
        write_cfg(tmp_path / f"c{i}", ta_config(llama_dirs["base"], [llama_dirs[m]]))
        for i, m in ((0, "a"), (1, "b"))
        if (tmp_path / f"c{i}").mkdir() is None
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SLOW_CLI, "0.01", str(c), str(out), "--no-progress"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in cfgs
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    got = load_file(out / "model.safetensors")
    candidates = [merge(ta_config(llama_dirs["base"], [llama_dirs[m]])) for m in ("a", "b")]
    assert any(all(torch.equal(got[k], c[k]) for k in c) for c in candidates)  # one whole merge, not a mix
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_killed_merge_leaves_no_partial_file_and_its_temp_is_cleaned(llama_dirs, tmp_path):
    out = tmp_path / "out"
    cfg = ta_config(llama_dirs["base"], [llama_dirs["a"]])
    merge(cfg, out=out)
    before = (out / "model.safetensors").read_bytes()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_CLI,
            "0.5",
            str(write_cfg(tmp_path, ta_config(llama_dirs["base"], [llama_dirs["b"]]))),
            str(out),
            "--no-progress",
        ]
    )
    deadline = time.time() + 120
    while not list(out.glob(".model.safetensors.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(out.glob(".model.safetensors.*.tmp")), "the writer never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "model.safetensors").read_bytes() == before  # the final path holds the old model, whole
    assert list(out.glob(".*.tmp"))  # the killed writer's temp file is orphaned ...
    merge(cfg, out=out)
    assert not list(out.glob(".*.tmp"))  # ... and the next merge into the directory removes it


def test_mergeguard_error_is_the_catch_all():
    for cls in (ConfigError, ForeignBaseError, NonFiniteError, OutputError, WeightsFileError):
        assert issubclass(cls, MergeGuardError)
