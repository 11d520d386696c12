"""Post-hoc protection of an existing checkpoint (``mergeguard-protect``), end to end on a tiny Llama."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
import yaml
from _helpers import tiny_llama, train_rows
from safetensors.torch import load_file

from lightning_mergeguard import MergeNeighbourhood, ParameterSelection, Release, ScaleAdversarial
from lightning_mergeguard.cli.protect import main
from lightning_mergeguard.errors import ConfigError, ForeignBaseError
from lightning_mergeguard.merging.sources import open_source
from lightning_mergeguard.posthoc import OwnerData, Refit, hold_out, load_rows, protect_checkpoint, protect_module

WORDS = ["".join(p) for p in itertools.permutations("abcdef", 2)]
ROWS = [(f"Q:{w}\nA:", "X" if w[0] in "abc" else "Y") for w in WORDS]  # generalises to held-out words
OTHER = [(f"R:{w}\nA:", "Z" if w[1] in "abc" else "W") for w in WORDS]


def tiny_lm(seed: int = 0):
    """A tiny Llama whose init scale (0.2) makes a short fine-tune move it like a real one (a few % per matrix)."""
    return tiny_llama(
        seed,
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=0.2,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, byte_tokenizer):
    """A base, the owner's fine-tune (upper-casing, learned), a partner fine-tune and a model of another base."""
    root = tmp_path_factory.mktemp("posthoc")
    torch.manual_seed(0)
    base = tiny_lm(seed=0)
    base.save_pretrained(root / "base")
    byte_tokenizer.save_pretrained(root / "base")
    owner_rows, _ = hold_out(ROWS, seed=0)  # the rows protect_checkpoint trains on; the rest stay held out
    owner = train_rows(tiny_lm(seed=0), byte_tokenizer, owner_rows, steps=100, lr=1e-3)
    owner.save_pretrained(root / "owner")
    byte_tokenizer.save_pretrained(root / "owner")
    partner = train_rows(tiny_lm(seed=0), byte_tokenizer, OTHER, steps=60, lr=1e-3)
    partner.save_pretrained(root / "partner")
    tiny_lm(seed=7).save_pretrained(root / "foreign")
    with (root / "rows.jsonl").open("w") as f:
        for p, a in ROWS:
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    return root


def test_protects_a_causal_lm_directory_end_to_end(checkpoints, tmp_path):
    out = tmp_path / "protected"
    report = protect_checkpoint(
        checkpoints / "base",
        checkpoints / "owner",
        str(checkpoints / "rows.jsonl"),
        out,
        partners=[str(checkpoints / "partner")],
        tolerance=13.0,  # 8 held-out rows: one row is 12.5 points
        progress=False,
        device="cpu",
        refit=None,
        stage2=ScaleAdversarial(steps=16, lr=1e-3),
    )
    assert report["score_before"] == 87.5  # the owner's fine-tune solves 7 of its 8 held-out rows
    assert report["score_before"] - report["score_after"] <= 13.0
    assert report["stage2"]["validation_passes"] == 18
    assert report["stage2"]["merge_proxy_after"] <= report["stage2"]["merge_proxy_before"]
    assert set(report["merges"]) == {"task arithmetic λ=0.3", "TIES (density 0.4)"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert AutoTokenizer.from_pretrained(out / "model").eos_token == "<eos>"  # the tokenizer travels with it
    original = AutoModelForCausalLM.from_pretrained(checkpoints / "owner").state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert changed and all("embed" not in k and "lm_head" not in k and k != "model.norm.weight" for k in changed)
    assert json.loads((out / "protection_report.json").read_text())["score_after"] == report["score_after"]
    card = (out / "MERGEGUARD.md").read_text()
    assert f"{report['score_before']:.1f} to {report['score_after']:.1f}" in card and "| TIES (density 0.4) |" in card


def test_partners_are_rehearsed_by_default(checkpoints, tmp_path):
    """With partners, "auto" runs MergeNeighbourhood against them: the guard rail's proxy merges with the partner.

    Through the command, whose --steps/--lr configure the strategy "auto" picks."""
    from lightning_mergeguard.cli.protect import main

    main(["--base", str(checkpoints / "base"), "--model", str(checkpoints / "owner"), "--data",
          str(checkpoints / "rows.jsonl"), "--out", str(tmp_path / "out"), "--partners", str(checkpoints / "partner"),
          "--tolerance", "13", "--no-progress", "--device", "cpu", "--refit-steps", "0", "--steps", "16",
          "--lr", "1e-3"])  # fmt: skip
    report = json.loads((tmp_path / "out" / "protection_report.json").read_text())
    s2 = report["stage2"]
    assert s2["settings"]["method"] == "merge_neighbourhood" and s2["partners"] == ["partner0"]
    assert s2["settings"]["partners"] == report["partners"] == [str(checkpoints / "partner")]
    assert s2["validation_passes"] == 3 * (1 + 8)  # own score and two proxy merges: before, then at 8 checks
    assert report["score_before"] - report["score_after"] <= 13.0
    assert s2["merge_proxy_after"] <= s2["merge_proxy_before"]
    card = (tmp_path / "out" / "MERGEGUARD.md").read_text()
    assert (
        "stage 2: merge_neighbourhood" in card
        and "task arithmetic with partner0 at owner/partner weights 1/0.3" in card
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage2": "neighbourhood"}, "stage2 must be one of"),
        ({"partners": "one/path"}, "partners must be a list of paths"),
        ({"stage2": "none"}, "stage2 'none' perturbs nothing: set amplify or an ownership key too"),
        # found before any model is loaded (they failed late, or as a traceback: RuntimeError for the device)
        ({"tolerance": -1.0}, "tolerance must be a number >= 0"),
        ({"refit": 50}, "refit must be a Refit"),
        ({"release": {"amplify": 4.0}}, "release must be a Release"),
        ({"device": "banana"}, "device 'banana' is not a device"),
        ({"device": "cuda:99"}, "device 'cuda:99'"),
    ],
)
def test_bad_stage2_options_name_the_problem(checkpoints, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        protect_checkpoint(
            checkpoints / "base", checkpoints / "owner", str(checkpoints / "rows.jsonl"), tmp_path, **kwargs
        )


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: Release(amplify=1.5), ValueError, "amplify must be a finite number >= 2"),
        (lambda: Release(amplify=float("nan")), ValueError, "amplify must be a finite number >= 2"),
        (lambda: Release(permute_residual=True), ValueError, "set amplify too"),
        (lambda: ScaleAdversarial(steps=-3), ValueError, "steps must be an integer >= 0, got -3"),
        (lambda: ScaleAdversarial(lr=0.0), ValueError, "lr must be > 0"),
        (lambda: OwnerData("rows.jsonl", batch_size=0), ConfigError, "batch_size must be an integer >= 1"),
        (lambda: OwnerData(3), ConfigError, "data must be a path"),
        (lambda: Refit(steps=2.5), ConfigError, "refit steps must be an integer >= 1"),
        (lambda: Refit(lr=0.0), ConfigError, "refit lr must be a number > 0"),
    ],
)
def test_the_objects_protect_checkpoint_takes_refuse_bad_values_when_built(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "-3"], "steps must be an integer >= 0, got -3"),
        (["--lr", "0"], "lr must be > 0"),
        (["--batch-size", "0"], "batch_size must be an integer >= 1"),
        (["--amplify", "1.5"], "amplify must be a finite number >= 2"),
        (["--permute-residual"], "set amplify too"),
        (["--stage2", "none", "--steps", "5"], "--steps/--lr/--deployed configure stage 2, but --stage2 is none"),
        (["--deployed", "int5"], "deployed: unknown weight format(s) ['int5']; known:"),
    ],
)
def test_the_command_refuses_bad_flags_in_one_line_before_loading_anything(
    checkpoints, tmp_path, capsys, argv, message
):
    from lightning_mergeguard.cli.protect import main

    code = main(["--base", str(checkpoints / "base"), "--model", str(checkpoints / "owner"), "--data",
                 str(checkpoints / "rows.jsonl"), "--out", str(tmp_path / "out"), *argv])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("partners", "message"),
    [
        (["owner"], "is the model being protected"),
        (["base"], "is the base model"),
        (["foreign", "foreign"], "is listed twice"),
    ],
)
def test_partners_must_be_other_fine_tunes(checkpoints, tmp_path, partners, message):
    with pytest.raises(ConfigError, match=message):
        protect_checkpoint(
            checkpoints / "base",
            checkpoints / "owner",
            str(checkpoints / "rows.jsonl"),
            tmp_path,
            partners=[str(checkpoints / p) for p in partners],
        )


def test_cli_with_a_yaml_config_and_clear_errors(checkpoints, tmp_path, capsys):
    config = tmp_path / "protect.yaml"
    config.write_text(
        f"base: {checkpoints / 'base'}\nmodel: {checkpoints / 'owner'}\ndata: {checkpoints / 'rows.jsonl'}\n"
        f"out: {tmp_path / 'out'}\nsteps: 4\nlr: 1.0e-4\nrefit_steps: 0\ntolerance: 100\nprogress: false\ndevice: cpu\n"
    )
    # Four steps at lr 1e-4 keep no stage-2 step: the model is the fine-tune, and the command says so (exit 3,
    # only the report written), naming what to change; it used to print "protected ... 87.5 -> 87.5" and exit 0.
    assert main(["--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert "NOT protected: no weight changed" in err and "raise --tolerance, --steps or --lr" in err
    assert not (tmp_path / "out" / "model").exists()
    report = json.loads((tmp_path / "out" / "protection_report.json").read_text())
    assert report["protected"] is False and report["written"] is None
    assert "NOT protected" in (tmp_path / "out" / "MERGEGUARD.md").read_text()
    assert main(["--config", str(config), "--accept-unprotected"]) == 0
    assert "wrote the unprotected model" in capsys.readouterr().err
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    code = main(["--config", str(config), "--model", str(checkpoints / "foreign"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a fine-tune of base" in err and "Traceback" not in err
    # A model directory named "model" protected into its parent would be replaced by the protected copy.
    shutil.copytree(checkpoints / "owner", tmp_path / "runs" / "model")
    kept = (tmp_path / "runs" / "model" / "model.safetensors").read_bytes()
    code = main(["--config", str(config), "--model", str(tmp_path / "runs" / "model"), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "over the model it reads" in err and "Traceback" not in err
    assert (tmp_path / "runs" / "model" / "model.safetensors").read_bytes() == kept
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"question": "c"}\n')
    code = main(["--config", str(config), "--data", str(bad)])
    assert code == 2 and 'bad.jsonl:2: each line must be {"prompt"' in capsys.readouterr().err


def test_amplify_keeps_the_function_and_breaks_merges(checkpoints, tmp_path, capsys):
    """--amplify: same held-out score after the symmetries, written weights far from the base, merges collapse."""
    out = tmp_path / "amp"
    args = [*("--base", str(checkpoints / "base"), "--model", str(checkpoints / "owner")), "--out", str(out)]
    args += ["--data", str(checkpoints / "rows.jsonl"), "--partners", f"[{checkpoints / 'partner'}]"]
    args += [*("--stage2", "scale_adversarial", "--steps", "4", "--refit_steps", "0", "--tolerance", "13")]
    assert main([*args, "--amplify", "1000", "--progress", "false", "--device", "cpu"]) == 0
    report = json.loads((out / "protection_report.json").read_text())
    amp = report["amplify"]
    assert amp["groups"] == {"norm->linear": 4, "q/k": 2, "v/o": 2, "up/down": 2} and not amp["reverted"]
    assert amp["score_after"] == amp["score_before"] == report["score_after"]
    assert report["validation_passes"] == report["stage2"]["validation_passes"] + 1  # one check after the symmetries
    # both standard merges fall to (or below) what they give unprotected, and task arithmetic collapses
    ta = report["merges"]["task arithmetic λ=0.3"]
    assert ta["protected"] <= 12.5 < ta["unprotected"], report["merges"]
    card = (out / "MERGEGUARD.md").read_text()
    assert "**Deploy with care: these weights are re-parameterised" in card and "0% in float16" in card
    from transformers import AutoModelForCausalLM

    written = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(checkpoints / "base").state_dict()
    key = "model.layers.0.mlp.down_proj.weight"
    assert (written[key] - base[key]).norm() > 0.5 * base[key].norm()


def test_amplify_with_a_permuted_stream_writes_the_same_function_with_its_channels_moved(checkpoints, tmp_path):
    """--permute_residual true: the report and card say so; the written embeddings are the owner's, columns permuted
    (stage 2 and amplify leave embeddings alone), and the held-out score is unchanged by both layers."""
    from lightning_mergeguard.protection.release.residual import draw_permutation

    out = tmp_path / "perm"
    args = [*("--base", str(checkpoints / "base"), "--model", str(checkpoints / "owner")), "--out", str(out)]
    args += ["--data", str(checkpoints / "rows.jsonl")]
    args += [*("--stage2", "scale_adversarial", "--steps", "4", "--refit_steps", "0", "--tolerance", "13")]
    args += ["--amplify", "1000", "--permute_residual", "true", "--progress", "false", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads((out / "protection_report.json").read_text())
    amp = report["amplify"]
    assert amp["applied"] and amp["residual"]["applied"] and amp["score_after"] == amp["score_before"]
    assert "residual stream were also permuted" in (out / "MERGEGUARD.md").read_text()
    from transformers import AutoModelForCausalLM

    written = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    owner = AutoModelForCausalLM.from_pretrained(checkpoints / "owner").state_dict()
    key = "model.embed_tokens.weight"
    assert torch.equal(written[key], owner[key][:, draw_permutation(owner[key].shape[1])])


def test_stage2_none_with_amplify_rewrites_the_fine_tune_alone_and_keeps_its_function(checkpoints, tmp_path):
    """--stage2 none --amplify 2**20: no perturbation, the fine-tune re-parameterised (scales up to 2**20 and the
    stream permuted); the written model's logits are the owner's, and the card says what re-alignment gives back."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "alone"
    args = [*("--base", str(checkpoints / "base"), "--model", str(checkpoints / "owner")), "--out", str(out)]
    args += ["--data", str(checkpoints / "rows.jsonl"), "--stage2", "none", "--amplify", str(2**20)]
    args += ["--permute_residual", "true", "--progress", "false", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads((out / "protection_report.json").read_text())
    assert report["stage2"]["settings"]["method"] == "none" and report["stage2"]["perturbed"] is False
    assert report["score_after"] == report["score_before"] and report["amplify"]["residual"]["applied"]
    assert report["validation_passes"] == 2  # the score before, and the check after the symmetries
    card = (out / "MERGEGUARD.md").read_text()
    assert "re-parameterisation below alone" in card and "giving the unprotected fine-tune back" in card
    written = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    owner = AutoModelForCausalLM.from_pretrained(checkpoints / "owner").eval()
    norm = written.model.layers[0].input_layernorm.weight
    assert float(norm.abs().max()) > 2.0**10 * float(owner.model.layers[0].input_layernorm.weight.abs().max())
    ids = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(written(ids).logits, owner(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("check_misses", [False, True])
def test_amplify_is_undone_when_the_model_is_not_what_it_looks_like(checkpoints, tmp_path, monkeypatch, check_misses):
    """A block that only looks symmetric (here: V rescaled without O) is caught by the forward check; if that check
    missed it, the guard rail's score puts the weights back. Either way the written model is not amplified."""
    from lightning_mergeguard.protection.release import amplify, symmetry

    real = symmetry.find_symmetries

    def broken(module, names=None):
        groups = real(module, names)
        return [symmetry.SymmetryGroup(g.kind, g.size, g.factors[:1], g.block) for g in groups if g.kind == "v/o"]

    monkeypatch.setattr(amplify, "find_symmetries", broken)
    if check_misses:
        missed = dict.fromkeys(["repeat", "v/o"], 0.0)
        monkeypatch.setattr(symmetry, "symmetry_errors", lambda *a, **k: dict(missed))
    with pytest.warns(UserWarning, match="amplification undone" if check_misses else "no exact symmetry"):
        report = protect_checkpoint(
            checkpoints / "base",
            checkpoints / "owner",
            str(checkpoints / "rows.jsonl"),
            tmp_path / "out",
            tolerance=13.0,
            progress=False,
            device="cpu",
            accept_unprotected=True,
            release=Release(amplify=1000.0),
            refit=None,
            stage2=ScaleAdversarial(steps=4, lr=1e-4),  # four steps at lr 1e-4 keep no stage-2 step
        )
    assert report["score_after"] == report["amplify"]["score_after"] and not report["amplify"]["applied"]
    assert report["protected"] is False and report["not_protected"]  # neither stage 2 nor amplify changed it
    assert "requested and not applied" in (tmp_path / "out" / "MERGEGUARD.md").read_text()
    if check_misses:
        assert report["amplify"]["reverted"] and report["score_after"] == report["amplify"]["score_before"]
    else:
        assert "no exact symmetry" in report["amplify"]["skipped"] and not report["amplify"]["reverted"]
    from transformers import AutoModelForCausalLM

    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(checkpoints / "base").state_dict()
    key = "model.layers.0.self_attn.v_proj.weight"
    assert (written[key] - base[key]).norm() < 0.5 * base[key].norm()


def test_foreign_base_and_bad_rows_raise_typed_errors(checkpoints, tmp_path):
    with pytest.raises(ForeignBaseError):
        protect_checkpoint(
            checkpoints / "base", checkpoints / "foreign", str(checkpoints / "rows.jsonl"), tmp_path, progress=False
        )
    (tmp_path / "few.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ConfigError, match="at least 4 are needed"):
        load_rows(tmp_path / "few.jsonl")


def digit_images():
    """A data entry point for the open_clip path: ``(train, val)`` datasets of (flattened digit image, label)."""
    from lightning_mergeguard.demos.digits import digits_task_data

    return digits_task_data("plain", "train"), digits_task_data("plain", "val")


@pytest.mark.slow
def test_protects_an_open_clip_classifier_checkpoint(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_mergeguard.io import save_safetensors
    from lightning_mergeguard.models.open_clip import ClipImageClassifier, build_open_clip
    from lightning_mergeguard.models.trainer import quiet_trainer

    pl.seed_everything(0)
    clip = build_open_clip("tiny")
    save_safetensors(tmp_path / "base.safetensors", clip.state_dict())
    module = ClipImageClassifier(clip.visual, 64, num_classes=10, lr=3e-3)
    train, _ = digit_images()
    quiet_trainer(max_epochs=3, accelerator="cpu").fit(module, DataLoader(train, batch_size=64, shuffle=True))
    save_safetensors(tmp_path / "finetune.safetensors", module.state_dict())
    from lightning_mergeguard.models.open_clip import TINY_VIT

    arch = tmp_path / "arch.json"  # the architecture as a config file, as for the benchmark's inline ViT config
    arch.write_text(json.dumps(TINY_VIT))
    report = protect_checkpoint(
        tmp_path / "base.safetensors",
        tmp_path / "finetune.safetensors",
        OwnerData("test_posthoc:digit_images", batch_size=64),
        tmp_path / "out",
        arch=str(arch),
        tolerance=1.5,
        progress=False,
        device="cpu",
        refit=None,
        stage2=ScaleAdversarial(steps=24, lr=1e-3),
    )
    assert report["kind"] == "open_clip" and report["score_before"] > 60
    assert report["score_before"] - report["score_after"] <= 1.5
    protected = open_source(tmp_path / "out" / "protected.safetensors").state_dict()
    original = module.state_dict()
    assert torch.equal(protected["head.weight"], original["head.weight"])  # the head is the owner's, untouched
    assert report["stage2"]["steps_used"] == 0 or any(
        not torch.equal(protected[k], original[k]) for k in original if k.startswith("visual.")
    )
    # A classifier saved from a DDP-wrapped model ('module.' before every key) is read as the bare one (it had been
    # refused: "needs 'head.weight'").
    from lightning_mergeguard.posthoc.models import _open_clip

    torch.save({f"module.{k}": v for k, v in original.items()}, tmp_path / "ddp.pt")
    data = OwnerData("test_posthoc:digit_images", batch_size=64)
    loaded = _open_clip(tmp_path / "base.safetensors", tmp_path / "ddp.pt", data, str(arch), 0, False)
    assert all(torch.equal(v, original[k]) for k, v in loaded[0].state_dict().items())


def test_open_clip_architecture_from_a_name_or_a_config_file(tmp_path):
    from lightning_mergeguard.models.open_clip import SMALL_VIT, build_open_clip

    small = build_open_clip("small")
    assert sum(p.numel() for p in small.visual.parameters()) == sum(
        p.numel() for p in build_open_clip(SMALL_VIT).visual.parameters()
    )
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL_VIT))
    assert build_open_clip(str(cfg)).visual.state_dict().keys() == small.visual.state_dict().keys()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SMALL_VIT, "vision_cgf": {}}))
    with pytest.raises(ValueError, match="unknown open_clip config keys"):
        build_open_clip(str(bad))
    with pytest.raises(FileNotFoundError):
        build_open_clip(str(tmp_path / "missing.yaml"))


def test_an_image_folder_is_read_at_the_towers_size_with_open_clips_preprocessing(tmp_path):
    """Images of any size and aspect ratio go through open_clip's preprocessing at the tower's input size.

    Before, a folder was resized to 224 on its short side only: mixed aspect ratios failed to batch, and a tower built
    for another size (the tiny ViT: 32) failed on its positional embedding.
    """
    from PIL import Image

    from lightning_mergeguard.io import save_safetensors
    from lightning_mergeguard.models.open_clip import ClipImageClassifier, build_open_clip

    torch.manual_seed(0)
    clip = build_open_clip("tiny")
    save_safetensors(tmp_path / "base.safetensors", clip.state_dict())
    save_safetensors(tmp_path / "ft.safetensors", ClipImageClassifier(clip.visual, 64, num_classes=2).state_dict())
    for label, shade in (("dark", 30), ("bright", 220)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i, size in enumerate([(40, 30), (64, 64), (20, 50), (33, 33)] * 2):
            Image.new("L" if i % 2 else "RGB", size, color=shade if i % 2 else (shade, shade, 0)).save(
                tmp_path / "images" / label / f"{i}.png"
            )
    report = protect_checkpoint(
        tmp_path / "base.safetensors",
        tmp_path / "ft.safetensors",
        OwnerData(str(tmp_path / "images"), batch_size=8),
        tmp_path / "out",
        arch="tiny",
        tolerance=100.0,
        progress=False,
        device="cpu",
        accept_unprotected=True,  # two steps protect nothing: this test reads the images
        refit=None,
        stage2=ScaleAdversarial(steps=2),
    )
    assert report["kind"] == "open_clip" and 0.0 <= report["score_before"] <= 100.0
    assert (tmp_path / "out" / "protected.safetensors").is_file()


def test_the_classifier_feeds_flattened_digits_at_the_towers_size():
    """A tower built for 48-pixel images (a real checkpoint's is 224) gets 48-pixel digits, not the tiny ViT's 32."""
    from lightning_mergeguard.models.open_clip import TINY_VIT, ClipImageClassifier, build_open_clip

    config = {**TINY_VIT, "vision_cfg": {**TINY_VIT["vision_cfg"], "image_size": 48}}
    module = ClipImageClassifier(build_open_clip(config).visual, 64, num_classes=10)
    assert module.image_size == 48 and module(torch.rand(5, 64)).shape == (5, 10)


def test_a_lora_adapter_is_protected_as_its_base_with_the_adapter_merged_in(checkpoints, tmp_path):
    # A PEFT adapter directory (or mergekit's BASE+ADAPTER) was refused as "not a Hugging Face causal-LM directory;
    # for an open_clip classifier checkpoint pass --arch". It is the base with B @ A * scaling merged in: protected
    # exactly as that full fine-tune, and written as a full model.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = checkpoints / "base"
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "up_proj"])
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    lora.save_pretrained(tmp_path / "adapter")
    lora.merge_and_unload().save_pretrained(tmp_path / "merged")
    settings = dict(
        stage2=ScaleAdversarial(steps=4, lr=1e-3),
        refit=None,
        tolerance=100.0,
        progress=False,
        device="cpu",
        accept_unprotected=True,
    )
    reports = {
        name: protect_checkpoint(base, model, str(checkpoints / "rows.jsonl"), tmp_path / name, **settings)
        for name, model in [
            ("full", tmp_path / "merged"),
            ("adapter", tmp_path / "adapter"),
            ("pair", f"{base}+{tmp_path / 'adapter'}"),
        ]
    }
    outs = {name: load_file(tmp_path / name / "model" / "model.safetensors") for name in reports}
    for name in ("adapter", "pair"):
        assert reports[name]["score_before"] == reports["full"]["score_before"]
        assert reports[name]["score_after"] == reports["full"]["score_after"]
        assert all(torch.allclose(outs[name][k], outs["full"][k], atol=1e-5) for k in outs["full"])
    # An adapter as a partner (BASE+ADAPTER, as in merge configs) is rehearsed and merged; the model itself is not one.
    pair = f"{base}+{tmp_path / 'adapter'}"
    with pytest.raises(ConfigError, match="is the model being protected"):
        protect_checkpoint(base, tmp_path / "adapter", "rows", tmp_path / "y", partners=[pair], **settings)
    rehearsed = {**settings, "stage2": MergeNeighbourhood(steps=4, lr=1e-3, partners=[pair])}
    report = protect_checkpoint(
        base, checkpoints / "owner", str(checkpoints / "rows.jsonl"), tmp_path / "p", partners=[pair], **rehearsed
    )
    assert report["stage2"]["settings"]["method"] == "merge_neighbourhood" and set(report["merges"])
    with pytest.raises(ConfigError, match=r"the adapter's base .* is not --base"):
        protect_checkpoint(checkpoints / "owner", f"{base}+{tmp_path / 'adapter'}", "rows", tmp_path / "x", **settings)


# ------------------------------------------------------------------------------ untrusted inputs of the command
def _protect_args(checkpoints, out, *extra):
    args = ["--base", str(checkpoints / "base"), "--model", str(checkpoints / "owner"), "--out", str(out)]
    return [*args, "--data", str(checkpoints / "rows.jsonl"), "--no-progress", "--device", "cpu", *extra]


def test_a_huge_line_a_non_utf8_file_and_too_many_rows_are_refused_by_name(tmp_path):
    """A 50 MB line took 7.3 GB and minutes: lines are read with their length bounded, before decoding."""
    rows = [json.dumps({"prompt": f"{i}", "answer": "a"}) for i in range(4)]
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(("\n".join(rows) + "\n").encode() + b'{"prompt": "' + b"x" * (3 << 20) + b'", "answer": "a"}\n')
    with pytest.raises(ConfigError, match=r"huge.jsonl:5: a line longer than 1048576 bytes; .*--max-row-bytes"):
        load_rows(huge)
    assert len(load_rows(huge, max_row_bytes=4 << 20)) == 5
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(("\n".join(rows) + "\n").encode() + '{"prompt": "café", "answer": "a"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.jsonl:5: not UTF-8 text"):
        load_rows(latin)
    with pytest.raises(ConfigError, match=r"more than 3 rows; .*--max-rows"):
        load_rows(huge, max_rows=3)


def test_a_long_prompt_is_cut_before_it_is_tokenized(byte_tokenizer):
    from lightning_mergeguard.models.causal_lm import LMTaskDataset

    seen = []

    class Counting:
        eos_token_id, pad_token_id = byte_tokenizer.eos_token_id, byte_tokenizer.pad_token_id

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return byte_tokenizer(text, **kwargs)

    row = LMTaskDataset(Counting(), [("p" * 5_000_000, "ok")], max_length=16)[0]
    assert max(seen) <= 16 * 64 and row["input_ids"].shape == (16,)
    short = LMTaskDataset(byte_tokenizer, [("abc", "ok")], max_length=16)[0]
    assert short["labels"].tolist()[3:6] == [*byte_tokenizer("ok", add_special_tokens=False).input_ids, 256]


@pytest.mark.parametrize("fault", ["pickle", "truncated", "config"])
def test_a_malicious_or_broken_model_directory_ends_in_one_line_naming_the_file(checkpoints, tmp_path, capsys, fault):
    import os
    import pickle

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints / "owner", bad)
    if fault == "pickle":  # a payload that would run on a plain unpickle; it must never run, nor be advised
        (bad / "model.safetensors").unlink()

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        with open(bad / "pytorch_model.bin", "wb") as f:
            pickle.dump({"w": Payload()}, f)
        where = "pytorch_model.bin"
    elif fault == "truncated":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
        where = "model.safetensors"
    else:
        (bad / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": ')
        where = "config.json"
    code = main(_protect_args(checkpoints, tmp_path / "out", "--model", str(bad)))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(bad / where) in err and "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out" / "model").exists()


def test_a_lora_adapter_declared_for_another_base_is_refused_naming_the_switch(checkpoints, tmp_path, capsys):
    """base + B @ A stays near any base, so the weights cannot tell; adapter_config.json's base can."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-base"
    shutil.copytree(checkpoints / "foreign", other)
    lora = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(other), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    lora.save_pretrained(tmp_path / "adapter")
    declared = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert declared == str(other)
    code = main(_protect_args(checkpoints, tmp_path / "out", "--model", str(tmp_path / "adapter")))
    err = capsys.readouterr().err
    assert code == 2 and "was trained on" in err and "--no-base-check" in err and "Traceback" not in err
    # A Hub id that names another model than the base's own config: refused too; the same id: accepted.
    from lightning_mergeguard.merging.lora import LoraSource

    cfg = json.loads((checkpoints / "base" / "config.json").read_text())
    named = tmp_path / "named-base"
    shutil.copytree(checkpoints / "base", named)
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "org/tiny-base"}))
    for declared, ok in [("org/other-model", False), ("org/tiny-base", True), ("org/tiny-base@main", True)]:
        (tmp_path / "adapter" / "adapter_config.json").write_text(
            json.dumps({**json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()),
                        "base_model_name_or_path": declared})
        )  # fmt: skip
        src = LoraSource(named, tmp_path / "adapter")
        if ok:
            src.check_declared_base()
        else:
            with pytest.raises(ForeignBaseError, match="org/other-model"):
                src.check_declared_base()


def test_an_fp16_checkpoint_is_written_in_fp16_and_an_overflowing_amplify_is_refused(checkpoints, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(checkpoints / "owner").half().save_pretrained(half)
    shutil.copy(checkpoints / "owner" / "tokenizer.json", half)
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoints / "owner" / f).is_file():
            shutil.copy(checkpoints / "owner" / f, half)
    # 2**20 scales leave float16's range: refused before anything is written, naming --dtype
    amp = ["--model", str(half), "--stage2", "none", "--amplify", str(2**20), "--permute-residual"]
    code = main(_protect_args(checkpoints, tmp_path / "o1", *amp))
    err = capsys.readouterr().err
    assert code == 2 and "writing float16 would overflow" in err and "--dtype" in err
    assert not (tmp_path / "o1" / "model").exists()
    assert main(_protect_args(checkpoints, tmp_path / "o2", *amp, "--dtype", "bfloat16")) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    written = load_file(tmp_path / "o2" / "model" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    # no amplify: the input's float16 is what is written (it was float32, silently)
    args = ["--model", str(half), "--steps", "2", "--refit-steps", "0", "--accept-unprotected"]
    assert main(_protect_args(checkpoints, tmp_path / "o3", *args)) == 0
    written = load_file(tmp_path / "o3" / "model" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.float16}
    assert json.loads((tmp_path / "o3" / "protection_report.json").read_text())["dtype"] == "float16"


def test_one_command_line_style_and_help_before_torch(checkpoints, tmp_path, capsys):
    import subprocess
    import sys

    code = (
        "import sys\nfrom lightning_mergeguard.cli.protect import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['--steps', 'many'])\nexcept SystemExit as e:\n    assert e.code == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--permute-residual" in proc.stdout and "--no-base-check" in proc.stdout
    assert "invalid int value: 'many'" in proc.stderr
    from lightning_mergeguard.cli.protect import _arguments

    bare = _arguments(_protect_args(checkpoints, tmp_path, "--permute-residual", "--no-base-check"))
    old = _arguments(_protect_args(checkpoints, tmp_path, "--permute_residual", "true", "--refit_steps", "0"))
    assert bare["permute_residual"] is True and bare["base_check"] is False
    assert old["permute_residual"] is True and old["refit_steps"] == 0
    listed = _arguments(_protect_args(checkpoints, tmp_path, "--partners", "[a, b]"))
    spaced = _arguments(_protect_args(checkpoints, tmp_path, "--partners", "a", "b"))
    assert listed["partners"] == spaced["partners"] == ["a", "b"]
    from lightning_mergeguard.cli.protect import _call

    deployed = _call(_arguments(_protect_args(checkpoints, tmp_path, "--deployed", "int4-g32", "int8-row")))["stage2"]
    assert type(deployed).__name__ == "ScaleAdversarial" and deployed.deployed == ("int4-g32", "int8-row")
    assert _call(_arguments(_protect_args(checkpoints, tmp_path)))["release"].key_strength == 0.1  # Release's
    assert (
        _call(_arguments(_protect_args(checkpoints, tmp_path, "--key-strength", "0.2")))["release"].key_strength == 0.2
    )
    with pytest.raises(ConfigError, match="key_strength must be a number in"):
        _call(_arguments(_protect_args(checkpoints, tmp_path, "--key-strength", "0.9")))
    one = tmp_path / "deployed.yaml"
    one.write_text("deployed: int4-g128\n")  # a config's plain string is one format
    assert _call(_arguments(["--config", str(one), *_protect_args(checkpoints, tmp_path)]))["stage2"].deployed == (
        "int4-g128",
    )
    config = tmp_path / "typo.yaml"
    config.write_text("tolerence: 2\n")
    assert main(["--config", str(config)]) == 2
    assert "unknown option(s) 'tolerence' (did you mean 'tolerance'?)" in capsys.readouterr().err
    # a refusal of the same-base check names the flag that turns it off
    assert main(_protect_args(checkpoints, tmp_path / "x", "--model", str(checkpoints / "foreign"))) == 2
    assert "--no-base-check" in capsys.readouterr().err


def test_ctrl_c_and_sigterm_during_start_up_exit_cleanly(monkeypatch, capsys):
    import os
    import signal

    import lightning_mergeguard.cli.protect as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_arguments", interrupted)
    assert cli.main([]) == 130
    assert "mergeguard-protect: interrupted" in capsys.readouterr().err

    def terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "_arguments", terminated)
    assert cli.main([]) == 143
    assert "mergeguard-protect: terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not cli.__dict__.get("_on_sigterm")  # the handler is put back


def test_deployment_check_scores_both_models_under_each_treatment(checkpoints, tmp_path):
    report = protect_checkpoint(
        checkpoints / "base",
        checkpoints / "owner",
        str(checkpoints / "rows.jsonl"),
        tmp_path / "out",
        stage2="none",
        progress=False,
        device="cpu",
        release=Release(amplify=2.0**20, permute_residual=True, deployment_check=True),
    )
    table = report["deployment"]
    assert {"none", "fp16", "int8-row", "gguf-q8_0", "finetune", "finetune-lora"} <= set(table)
    assert table["none"]["protected"] == table["none"]["unprotected"] == report["score_before"]
    assert table["fp16"]["unprotected"] >= table["none"]["unprotected"] - 13  # a plain fine-tune survives fp16...
    assert table["fp16"]["protected"] < table["fp16"]["unprotected"]  # ... the 2**20 release does not
    card = (tmp_path / "out" / "MERGEGUARD.md").read_text()
    assert "| fp16 |" in card and "Deployed as users deploy it" in card


def test_a_config_asking_for_a_huge_model_allocates_nothing_and_bad_partner_lists_are_named(
    checkpoints, tmp_path, capsys
):
    """A config.json of 64 layers of width 16384 (~200 GB in float32) beside tiny weights: refused from shapes alone."""
    import resource

    bomb = tmp_path / "bomb"
    shutil.copytree(checkpoints / "owner", bomb)
    cfg = json.loads((bomb / "config.json").read_text())
    cfg.update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=64, num_attention_heads=128)
    (bomb / "config.json").write_text(json.dumps(cfg))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(_protect_args(checkpoints, tmp_path / "o", "--model", str(bomb))) == 2
    err = capsys.readouterr().err
    assert "its config says" in err or "the weights lack" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2 << 20  # KiB: under 2 GiB more at peak
    for bad in ("[a, {b: c}]", "[a, b"):  # an argument error, answered as argparse answers them (exit 2)
        with pytest.raises(SystemExit) as exit_:
            main(_protect_args(checkpoints, tmp_path / "o", "--partners", bad))
        assert exit_.value.code == 2 and f"--partners {bad!r}: give paths" in capsys.readouterr().err
    (bomb / "config.json").write_bytes(b" " * (65 << 20))
    assert main(_protect_args(checkpoints, tmp_path / "o", "--model", str(bomb))) == 2
    assert "a config of more than 64 MiB is refused" in capsys.readouterr().err


def test_protect_module_deployment_check_fine_tunes_on_as_many_batches_as_it_claims(monkeypatch):
    """A short list of owner batches is cycled for the 50-step fine-tuning treatments, not cut to its length."""
    import itertools

    from lightning_mergeguard.posthoc import module as posthoc_module

    seen = []

    def recording(module, metric, *, batches, loss_fn, **kw):
        seen.append(len(list(itertools.islice(batches, 50))))
        return {"none": metric(module)}

    monkeypatch.setattr(posthoc_module, "deployment_check", recording)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    base = {f"{k}": v.detach().clone() - 0.05 for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 4), torch.randint(3, (8,))) for _ in range(2)]
    report = protect_module(
        model,
        base,
        batches,
        lambda m: 50.0,
        stage2=ScaleAdversarial(steps=2),
        tolerance=100.0,
        parameters=ParameterSelection(stage2_exclude=[]),
        release=Release(deployment_check=True),
    )
    assert seen == [50, 50] and set(report["deployment"]) == {"none"}
