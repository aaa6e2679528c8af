"""The command line, end to end on tiny random backbones and real digits (scikit-learn)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vpeft
from vpeft.cli import main
from vpeft.data import ensure_digits_task


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    ensure_digits_task(root)
    return root


def _train(data_root, out, *extra):
    argv = [
        "train", "--backbone", "test_vit", "--no-pretrained", "--task", "digits", "--data-root", str(data_root),
        "--img-size", "32", "--epochs", "1", "--batch-size", "64", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip
    return main(argv)


def test_methods_table(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in vpeft.list_methods():
        assert f"| {name} |" in out
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(vpeft.list_methods())


def test_train_eval_merge_round_trip(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data_root, out, "--method", "lora", "--opt", "r=4", "--opt", "targets=q,v,fc1") == 0
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "metrics.json", "result.json"]
    result = json.loads((out / "result.json").read_text())
    assert result["config"] == {"method": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v", "fc1"]}
    assert result["eval_n"] == 797 and result["num_classes"] == 10
    capsys.readouterr()
    assert main(["eval", "--delta", str(out / "delta.safetensors"), "--data-root", str(data_root)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["top1"] == pytest.approx(result["top1"]), "eval of the saved delta reproduces the training run"
    assert main(["eval", "--delta", str(out / "delta.safetensors"), "--data-root", str(data_root), "--merged"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(result["top1"], abs=2e-3)
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--delta", str(out / "delta.safetensors"), "--out", str(merged)]) == 0
    state = load_file(merged)
    assert not any("lora" in k or "base_layer" in k for k in state), "a plain timm state dict"
    assert state["head.weight"].shape == (10, 64)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "lorra"], "unknown method 'lorra'. Did you mean 'lora'"),
        (["--method", "lora", "--opt", "rank=3"], "unknown option 'rank'; valid options: alpha, dropout, r, targets"),
        (["--method", "lora", "--opt", "r=abc"], "option r='abc' is not a valid int"),
        (["--method", "lora", "--opt", "r=0"], "r=0 is invalid; expected an integer >= 1"),
        (["--method", "vpt_deep", "--opt", "num_tokens=-1"], "num_tokens=-1 is invalid"),
        (["--method", "lora", "--epochs", "0"], "epochs"),
        (["--method", "lora", "--eval-split", "tset"], "no split 'tset'"),
    ],
)
def test_bad_input_one_line_error_and_no_output(data_root, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert _train(data_root, out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (out / "delta.safetensors").exists() and not (out / "result.json").exists()


def test_unknown_task_lists_tasks(data_root, tmp_path, capsys):
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "lora", "--task", "cifar"]
    assert main([*argv, "--data-root", str(data_root), "--out", str(tmp_path / "o")]) == 2
    assert "task 'cifar' not found" in capsys.readouterr().err


def test_unsupported_pair_on_cnn(data_root, tmp_path, capsys):
    argv = ["train", "--backbone", "test_efficientnet", "--no-pretrained", "--method", "vpt_deep", "--task", "digits"]
    assert main([*argv, "--data-root", str(data_root), "--out", str(tmp_path / "o")]) == 2
    assert "cannot be applied to timm_efficientnet (cnn) backbones" in capsys.readouterr().err


def test_label_out_of_range(tmp_path, capsys):
    root = tmp_path / "data"
    ensure_digits_task(root)
    lines = (root / "digits" / "test.txt").read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0] + " 12"
    (root / "digits" / "test.txt").write_text("\n".join(lines) + "\n")
    # classes.txt fixes 10 classes, so label 12 is out of range
    assert _train(root, tmp_path / "o", "--method", "linear") == 2
    assert "12" in capsys.readouterr().err


def test_cnn_bitfit_trains(data_root, tmp_path):
    argv = ["train", "--backbone", "test_efficientnet", "--no-pretrained", "--method", "bitfit", "--task", "digits"]
    assert (
        main(
            [
                *argv,
                "--data-root",
                str(data_root),
                "--img-size",
                "32",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "o"),
                "--quiet",
            ]
        )
        == 0
    )
    assert torch.isfinite(torch.tensor(json.loads((tmp_path / "o" / "result.json").read_text())["top1"]))


def test_compose_from_the_command_line(data_root, tmp_path):
    out = tmp_path / "run"
    assert (
        _train(data_root, out, "--method", "lora+vpt_deep", "--opt", "lora.r=2", "--opt", "vpt_deep.num_tokens=3") == 0
    )
    cfg = json.loads((out / "result.json").read_text())["config"]
    assert cfg["method"] == "compose"
    assert [m["method"] for m in cfg["methods"]] == ["lora", "vpt_deep"]
    assert cfg["methods"][0]["r"] == 2 and cfg["methods"][1]["num_tokens"] == 3


def test_compose_option_must_name_its_method(data_root, tmp_path, capsys):
    assert _train(data_root, tmp_path / "o", "--method", "lora+vpt_deep", "--opt", "r=2") == 2
    assert "must name its method when composing" in capsys.readouterr().err


def test_train_is_reproducible_from_its_seed(data_root, tmp_path):
    """The head and the method's parameters are drawn from --seed: two runs give identical deltas."""
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(runs, (0, 0, 1)):
        assert _train(data_root, out, "--method", "lora", "--seed", str(seed)) == 0
    a, b, c = (load_file(out / "delta.safetensors") for out in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed gives another run"
