"""The newcomer path (issue 22): what the README's first steps rely on works as written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_subpackages_are_attributes_after_a_plain_import():
    # a fresh interpreter: nothing but `import vpeft` has run, as in the README's Quick start
    code = """
import sys, torch, timm, vpeft
assert "vpeft.train" not in sys.modules          # imported on first access, not by `import vpeft`
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                          depth=1, num_heads=2, num_classes=3)
vpeft.apply(model, vpeft.LoRAConfig(r=2, targets=("q", "v")))
loader = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
result = vpeft.train.train(model, loader, vpeft.train.TrainConfig(epochs=1, lr=1e-3, batch_size=4), progress=False)
assert len(result.history) == 1
for name in ("data", "backbones", "interop", "run", "tune"):
    assert getattr(vpeft, name).__name__ == "vpeft." + name
assert "train" in dir(vpeft)
try:
    vpeft.no_such_thing
except AttributeError as e:
    assert "no_such_thing" in str(e)
else:
    raise SystemExit("no AttributeError")
print("ok")
"""
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


# ---- CLIP through the CLI, on a tiny random open_clip (no weights exist offline; none are downloaded) ----------
def tiny_clip_for_cli(monkeypatch) -> None:
    """Every ``open_clip:<model>`` name the CLI builds becomes a tiny random open_clip CLIP (same seed each time,
    so a delta trained on it loads onto the next one)."""
    pytest.importorskip("open_clip")
    from vpeft.backbones import clip

    def create(name, pretrained=None, img_size=None, num_classes=0, **kwargs):
        model = clip.tiny_open_clip(image_size=img_size or 32)
        model.name = name
        return model

    monkeypatch.setattr(clip, "create", create)


def test_few_shot_clip_on_a_task_whose_images_folder_is_a_symlink(tmp_path, monkeypatch, capsys):
    from test_clip_fewshot import make_task

    from vpeft.cli import main

    tiny_clip_for_cli(monkeypatch)
    task = make_task(tmp_path / "data", "toy")
    elsewhere = tmp_path / "storage" / "toy_images"
    elsewhere.parent.mkdir()
    (task / "images").rename(elsewhere)
    (task / "images").symlink_to(elsewhere, target_is_directory=True)
    lists = tmp_path / "lists"
    argv = ["train", "--backbone", "open_clip:ViT-B-16", "--no-pretrained", "--method", "coop", "--opt",
            "num_tokens=2", "--task", "toy", "--data-root", str(tmp_path / "data"), "--img-size", "32",
            "--epochs", "1", "--batch-size", "4", "--quiet", "--task-opt", "shots=2", "--task-opt", "classes=base",
            "--task-opt", f"lists_dir={lists}", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    written = list(lists.glob("toy_base_*shots2_seed0.txt"))
    assert len(written) == 1
    rows = written[0].read_text().split()
    assert all(r.startswith("images/") for r in rows[::2]), "paths stay relative to the task folder, through the link"
    from vpeft.data.fewshot import read_list

    assert len(read_list(written[0], task)) == 3 * 2  # base = the first ceil(5/2) classes, 2 shots each


def test_a_sample_outside_the_task_folder_is_a_data_error(tmp_path):
    import vpeft
    from vpeft.data.fewshot import relative_to_task, write_list

    (tmp_path / "task" / "images").mkdir(parents=True)
    assert relative_to_task(tmp_path / "task" / "images" / "a.png", tmp_path / "task") == "images/a.png"
    with pytest.raises(vpeft.DataError, match="is not inside the task folder"):
        write_list([(tmp_path / "other.png", 0)], tmp_path / "list.txt", tmp_path / "task")


def test_linear_on_a_zero_shot_clip_says_to_add_the_probe(tmp_path, monkeypatch, capsys):
    from test_clip_fewshot import make_task

    from vpeft.cli import main

    tiny_clip_for_cli(monkeypatch)
    make_task(tmp_path / "data", "toy")
    argv = ["train", "--backbone", "open_clip:ViT-B-16", "--no-pretrained", "--method", "linear", "--task", "toy",
            "--data-root", str(tmp_path / "data"), "--img-size", "32", "--epochs", "1", "--batch-size", "5",
            "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "no-probe")]) == 2
    err = capsys.readouterr().err
    assert "--task-opt probe=true" in err and "no classification head" not in err
    assert len(err.strip().splitlines()) == 1
    assert main([*argv, "--task-opt", "probe=true", "--out", str(tmp_path / "probe")]) == 0  # the fix it names
    result = json.loads((tmp_path / "probe" / "result.json").read_text())
    assert result["task_spec"]["probe"] is True and result["method"] == "linear"


def _native_zero_shot(task: Path, split: str) -> tuple[float, float, int]:
    """Top-1 and mean cross-entropy of open_clip's own CLIP forward (the tiny CLIP's weights, open_clip's
    tokenizer, CoOp's default template) on a split: the oracle of ``vpeft zeroshot``."""
    import open_clip
    import torch
    from PIL import Image
    from test_clip import _native_open_clip
    from torch.nn import functional as F

    from vpeft.backbones.clip import tiny_open_clip
    from vpeft.data import build_transform

    native = _native_open_clip()
    names = [n.replace("_", " ") for n in (task / "classes.txt").read_text().split()]
    transform = build_transform(tiny_open_clip(), input_size=32)
    rows = [line.rsplit(" ", 1) for line in (task / f"{split}.txt").read_text().splitlines() if line.strip()]
    x = torch.stack([transform(Image.open(task / rel).convert("RGB")) for rel, _ in rows])
    y = torch.tensor([int(label) for _, label in rows])
    with torch.no_grad():
        text = native.encode_text(open_clip.tokenize([f"a photo of a {n}." for n in names]), normalize=True)
        logits = native.logit_scale.exp() * native.encode_image(x, normalize=True) @ text.T
    return (logits.argmax(1) == y).sum().item() / len(rows), F.cross_entropy(logits, y).item(), len(rows)


def test_zeroshot_command_evaluates_a_clip_on_a_task_folder(tmp_path, monkeypatch, capsys):
    from test_clip_fewshot import make_task

    from vpeft.cli import main

    tiny_clip_for_cli(monkeypatch)
    task = make_task(tmp_path / "data", "toy")
    argv = ["zeroshot", "--backbone", "open_clip:ViT-B-16", "--no-pretrained", "--task", "toy",
            "--data-root", str(tmp_path / "data"), "--img-size", "32", "--split", "test"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "zs" / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert json.loads(printed[: printed.rindex("}") + 1]) == written
    top1, loss, n = _native_zero_shot(task, "test")
    assert written["n"] == n == 10 and written["task"] == "toy" and written["split"] == "test"
    assert written["top1"] == pytest.approx(top1, abs=1e-9) and written["loss"] == pytest.approx(loss, abs=1e-4)
    assert written["task_spec"]["class_names"][2] == "crystalline rock"
    # bad input: one line, exit 2
    for extra, needle in (
        (["--task-opt", "probe=true"], "trains nothing"),
        (["--task", "nope"], "nope"),
        (["--task-opt", "colour=red"], "unknown task option"),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert main(["zeroshot", "--backbone", "vit_tiny_patch16_224", "--task", "toy",
                 "--data-root", str(tmp_path / "data")]) == 2  # fmt: skip
    assert "is not a CLIP" in capsys.readouterr().err


# ---- vpeft export / import: Hugging Face PEFT adapters from the command line ----------------------------------
def _toy_lora_run(tmp_path, name: str, *opts: str) -> Path:
    from test_clip_fewshot import make_task

    from vpeft.cli import main

    if not (tmp_path / "data" / "toy").exists():
        make_task(tmp_path / "data", "toy")
    out = tmp_path / name
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--task", "toy", "--data-root",
            str(tmp_path / "data"), "--img-size", "32", "--epochs", "1", "--batch-size", "10", "--lr", "1e-2",
            "--quiet", "--method", "lora", *opts, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out / "delta.safetensors"


def _eval(capsys, delta: Path, data_root: Path) -> dict:
    from vpeft.cli import main

    capsys.readouterr()
    assert main(["eval", "--delta", str(delta), "--data-root", str(data_root)]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_peft_and_import_round_trip_through_the_cli(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    import torch

    from vpeft.cli import main
    from vpeft.run import build_backbone, model_from_delta

    delta = _toy_lora_run(tmp_path, "run", "--opt", "r=2", "--opt", "targets=qkv,fc1")
    adapter = tmp_path / "adapter"
    assert main(["export", "--format", "peft", str(delta), "--out", str(adapter)]) == 0
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = model_from_delta(delta)[0].eval()
    theirs = peft.PeftModel.from_pretrained(build_backbone("test_vit", 5, 32, pretrained=False), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)
    back = tmp_path / "back.safetensors"
    assert main(["import", "--format", "peft", str(adapter), "--out", str(back)]) == 0  # the export names it all
    original, imported = _eval(capsys, delta, tmp_path / "data"), _eval(capsys, back, tmp_path / "data")
    assert imported["task"] == "toy" and imported["n"] == original["n"] == 10
    assert imported["top1"] == original["top1"] and imported["loss"] == pytest.approx(original["loss"], abs=1e-6)


def test_export_of_qv_only_lora_needs_pad_fused_and_imports_its_config(tmp_path, capsys):
    pytest.importorskip("peft")
    from vpeft.api import read_delta
    from vpeft.cli import main

    delta = _toy_lora_run(tmp_path, "run", "--opt", "r=2", "--opt", "targets=q,v")
    adapter = tmp_path / "adapter"
    assert main(["export", "--format", "peft", str(delta), "--out", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "--pad-fused" in err and len(err.strip().splitlines()) == 1 and not adapter.exists()
    assert main(["export", "--format", "peft", str(delta), "--out", str(adapter), "--pad-fused"]) == 0
    back = tmp_path / "back.safetensors"
    assert main(["import", "--format", "peft", str(adapter), "--out", str(back)]) == 0
    assert read_delta(back)[0]["config"] == read_delta(delta)[0]["config"]  # q, v: from the export's metadata
    assert _eval(capsys, back, tmp_path / "data")["top1"] == _eval(capsys, delta, tmp_path / "data")["top1"]


def test_import_of_a_peft_trained_adapter(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    import torch

    from vpeft.cli import main
    from vpeft.run import build_backbone, model_from_delta

    pm = peft.get_peft_model(
        build_backbone("test_vit", 7, 32, pretrained=False),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=r"blocks\.\d+\.attn\.qkv", modules_to_save=["head"]),
    )
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1)
    pm.save_pretrained(str(tmp_path / "adapter"))
    back = tmp_path / "back.safetensors"
    argv = ["import", "--format", "peft", str(tmp_path / "adapter"), "--out", str(back)]
    assert main(argv) == 2 and "pass --backbone" in capsys.readouterr().err  # a foreign adapter names no backbone
    assert main([*argv, "--backbone", "test_vit", "--img-size", "32", "--no-pretrained"]) == 0
    model, extra, _ = model_from_delta(back)
    assert extra["num_classes"] == 7 and extra["img_size"] == 32  # the classes from the adapter's saved head
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), pm.eval()(x), rtol=0, atol=1e-5)


# ---- help text: plain text, every option documented with its default ----------------------------------------
def _subcommands():
    import argparse

    from vpeft.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_help_is_plain_text_and_every_option_has_help_and_its_default():
    import argparse

    commands = _subcommands()
    assert {"train", "eval", "search", "demo", "zeroshot", "export", "import"} <= set(commands)
    for name, p in commands.items():
        text = p.format_help()
        for markup in (":func:", ":class:", ":meth:", ":mod:", ":data:", "``"):
            assert markup not in text, f"vpeft {name} --help shows {markup!r}"
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help, f"vpeft {name}: {flag} has no help text"
            if name in ("train", "eval", "search", "demo") and action.option_strings and not action.required:
                shown = p._get_formatter()._expand_help(action)
                assert "default" in shown, f"vpeft {name}: {flag} shows no default: {shown!r}"


def test_train_help_renders_docstring_roles():
    text = " ".join(_subcommands()["train"].format_help().split())
    assert "In vpeft.run.finetune() (vpeft train, vpeft bench)" in text
    assert "--lr FLOAT Peak learning rate of AdamW (> 0). (default: 0.001)" in text
    assert "--quiet no progress bars (default: off)" in text


def test_plain_text():
    from vpeft.cli import plain_text

    assert plain_text("see :func:`train` and :class:`~vpeft.tasks.Task`") == "see train() and Task"
    assert plain_text(":meth:`vpeft.tasks.Task.loss`, ``x=1``") == "vpeft.tasks.Task.loss(), x=1"
    assert plain_text(":py:class:`the task <vpeft.tasks.Task>` and :data:`SPLITS`") == "the task and SPLITS"


# ---- a rejected invocation leaves no --out folder behind ----------------------------------------------------
@pytest.mark.parametrize(
    "args,message",
    [
        (["--opt", "r=-1"], "r=-1 is invalid"),
        (["--lr", "-1e-3"], "--lr must be a number in (0.0"),
        (["--task", "no_such_task"], "no_such_task"),
        (["--method", "no_such_method"], "no_such_method"),
        (["--backbone", "no_such_backbone"], "no_such_backbone"),
        (["--train-split", "train9"], "train9"),
        (["--img-size", "8"], "img_size 8"),
        (["--task-opt", "colour=red"], "colour"),
        (["--device", "tpu9"], "tpu9"),
    ],
)
def test_a_rejected_train_leaves_no_out_folder(tmp_path, capsys, args, message):
    from test_clip_fewshot import make_task

    from vpeft.cli import main

    make_task(tmp_path / "data", "toy")
    out = tmp_path / "new" / "nested" / "run"
    flags = {"--backbone": "test_vit", "--method": "lora", "--task": "toy", "--img-size": "32"}
    repeated = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in ("--opt", "--task-opt"):
            repeated += [flag, value]
        else:
            flags[flag] = value
    argv = ["train", "--no-pretrained", "--data-root", str(tmp_path / "data"), "--epochs", "1", "--quiet",
            "--out", str(out), *[t for kv in flags.items() for t in kv], *repeated]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists(), f"{args}: left {sorted(str(p) for p in (tmp_path / 'new').rglob('*'))}"


def test_a_rejected_train_keeps_an_out_folder_that_existed(tmp_path, capsys):
    from vpeft.cli import main

    out = tmp_path / "run"
    out.mkdir()
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "lora", "--opt", "r=-1",
            "--task", "digits", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert out.is_dir(), "a folder the user made stays"


def test_overwrite_with_bad_flags_keeps_the_previous_run(tmp_path, capsys):
    """Flags are checked before --overwrite removes the previous run's files: a typo does not cost the old run."""
    from vpeft.cli import main

    delta = _toy_lora_run(tmp_path, "run", "--opt", "r=2")
    before = sorted(p.name for p in delta.parent.iterdir())
    base = ["train", "--backbone", "test_vit", "--no-pretrained", "--task", "toy", "--data-root",
            str(tmp_path / "data"), "--img-size", "32", "--quiet", "--method", "lora", "--out", str(delta.parent),
            "--overwrite"]  # fmt: skip
    for bad in (["--opt", "r=-1"], ["--lr", "-1e-3"], ["--opt", "colour=red"]):
        assert main([*base, *bad]) == 2
        assert sorted(p.name for p in delta.parent.iterdir()) == before, bad
    capsys.readouterr()


# ---- benchmarks/bench_step.py: what --quick prints ----------------------------------------------------------
def _bench_step():
    import importlib

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("bench_step")


def test_bench_step_says_more_time_when_slower_and_judges_only_the_full_setting():
    bs = _bench_step()
    assert bs.time_change(1.25) == "20.0% less time" and bs.time_change(1 / 1.161) == "16.1% more time"
    rows = [{"config": "lora_wide", "x_limit": 1.2, "backprop": True, "checks_ok": True, "saved_mib": 600.0}]
    by = {"lora_wide": {"step_s": 1.161}, "peft_wide": {"step_s": 1.0}, "limit": {"saved_mib": 560.0}}  # slower
    full = "\n".join(bs.summarise(rows, by, judge=True))
    assert "(16.1% more time) -> NOT met (>= 1.25x)" in full and "less time" not in full
    assert "1.200x the limit -> NOT met (<= 1.05x)" in full
    assert "saved activations 600.0 MiB = 1.071x the limit's -> met (<= 1.15x)" in full
    quick = "\n".join(bs.summarise(rows, by, judge=False))
    assert "met" not in quick.replace("not judged", "") and "## Targets (not judged: --quick" in quick
    assert "1.200x the limit (target <= 1.05x)" in quick and "(16.1% more time) (target >= 1.25x)" in quick
