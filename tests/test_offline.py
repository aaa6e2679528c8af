"""Model hubs offline (vpeft.backbones.hub): decided before any hub call, cached weights load, one-line refusals.

"No network" is simulated, never real: ``hub_reachable`` is patched, or ``HF_HUB_OFFLINE`` / ``--offline`` is set.
Every test also replaces the hub's download functions and ``socket`` connections by guards that record the call
and raise, so a build that reached for the hub fails the test even where a library swallows the error. A fake
Hugging Face cache (the ``models--org--name/refs/main`` + ``snapshots/<sha>/`` layout that
``huggingface_hub.try_to_load_from_cache`` reads) stands in for weights downloaded earlier.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from vpeft import backbones
from vpeft.backbones import hub

SHA = "0123456789abcdef0123456789abcdef01234567"
TRIGGERS = ("no network", "env", "flag")


def fake_cache(root: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in a Hugging Face cache at ``root`` (its files are written by the caller)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(SHA)
    snapshot = folder / "snapshots" / SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """An empty hub cache, the network and every hub download replaced by guards; returns the guards' call log."""
    import huggingface_hub
    import huggingface_hub.file_download

    calls: list[str] = []

    def guard(what, original=None):
        def refuse(*args, **kwargs):
            if original is not None and kwargs.get("local_files_only"):  # a cache read, no request
                return original(*args, **kwargs)
            calls.append(what)
            raise AssertionError(f"{what} called offline: {args}")

        return refuse

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's ~/.cache/clip
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch hub's checkpoints (timm URL weights)
    monkeypatch.setattr(socket, "create_connection", guard("socket.create_connection"))
    monkeypatch.setattr(socket.socket, "connect", guard("socket.connect"))
    for module in (huggingface_hub, huggingface_hub.file_download, timm.models._hub):
        original = module.hf_hub_download
        monkeypatch.setattr(module, "hf_hub_download", guard(f"{module.__name__}.hf_hub_download", original))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", guard("snapshot_download"))
    open_clip = pytest.importorskip("open_clip")
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", guard("open_clip hf_hub_download"))
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", guard("open_clip url download"))
    return calls


def go_offline(trigger: str, monkeypatch) -> str:
    """Make the hub offline one way; return the words the refusal names it by."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # tests/conftest.py sets them for the whole suite
        monkeypatch.delenv(var, raising=False)
    if trigger == "no network":
        monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.CONNECT_TIMEOUT_S: False)
        return "huggingface.co:443 cannot be reached"
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=0: pytest.fail("a connection test despite offline mode"))
    if trigger == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return "HF_HUB_OFFLINE=1 is set"
    return "--offline is set"  # the caller enters hub.offline_mode()


def build(trigger: str, name: str, **kwargs):
    if trigger == "flag":
        with hub.offline_mode():
            return backbones.create(name, **kwargs)
    return backbones.create(name, **kwargs)


# ---- refusals ----------------------------------------------------------------------------------------------------
HUB_NAMES = {
    "timm": ("vit_base_patch16_224", "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    "timm url": ("resnet50.tv_in1k", "resnet50-0676ba61.pth"),
    "timm hf-hub": ("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "timm/vit_tiny_patch16_224.augreg_in21k"),
    "open_clip": ("open_clip:ViT-B-16", "timm/vit_base_patch16_clip_224.openai"),
    "hf": ("hf:openai/clip-vit-base-patch16", "openai/clip-vit-base-patch16"),
}


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("kind", list(HUB_NAMES))
def test_pretrained_hub_names_are_refused_in_one_line_before_any_hub_call(kind, trigger, guarded, monkeypatch):
    if kind == "hf":
        pytest.importorskip("transformers")
    name, source = HUB_NAMES[kind]
    reason = go_offline(trigger, monkeypatch)
    with pytest.raises(hub.HubOfflineError) as err:
        build(trigger, name, pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and guarded == []
    assert msg.startswith(f"backbone {name!r}: ") and source in msg and reason in msg
    assert "not in the local Hugging Face cache" in msg and "--no-pretrained" in msg and "local" in msg


def test_cli_refusal_is_one_line_exit_2_and_offline_is_scoped(tmp_path, guarded, monkeypatch, capsys):
    from test_clip_fewshot import make_task

    from vpeft.cli import main

    go_offline("flag", monkeypatch)
    make_task(tmp_path / "data", "toy")
    for backbone in ("open_clip:ViT-B-16", "vit_base_patch16_224", "hf:openai/clip-vit-base-patch16"):
        data = ["--task", "toy", "--data-root", str(tmp_path / "data"), "--epochs", "1", "--quiet"]
        argv = ["train", "--backbone", backbone, "--method", "lora", *data, "--offline", "--out", str(tmp_path / "run")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("vpeft train: error: backbone") and "--offline is set" in err and "--no-pretrained" in err
    assert guarded == [] and "HF_HUB_OFFLINE" not in os.environ, "--offline ends with the command"
    assert not (tmp_path / "run" / "delta.safetensors").exists()


def test_every_command_that_builds_a_backbone_takes_offline():
    from vpeft.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    with_flag = {n for n, p in sub.choices.items() if any("--offline" in a.option_strings for a in p._actions)}
    builders = {n for n, p in sub.choices.items() if any("--no-pretrained" in a.option_strings for a in p._actions)}
    assert builders <= with_flag, "a command with --no-pretrained lacks --offline"
    assert {"eval", "merge", "bench"} <= with_flag  # they rebuild the backbone a delta / definition names


# ---- cached weights load offline ------------------------------------------------------------------------------
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_cached_timm_weights_load_offline(trigger, tmp_path, guarded, monkeypatch):
    go_offline(trigger, monkeypatch)
    cfg = timm.models.get_pretrained_cfg("test_vit")
    torch.manual_seed(1)
    weights = timm.create_model("test_vit", pretrained=False, num_classes=cfg.num_classes).state_dict()
    save_file(weights, str(fake_cache(tmp_path / "hf", cfg.hf_hub_id) / "model.safetensors"))
    model = build(trigger, "test_vit", pretrained=True, num_classes=0)
    got = model.state_dict()
    assert guarded == []
    assert got.keys() == {k for k in weights if not k.startswith("head.")}
    assert all(torch.equal(got[k], weights[k]) for k in got), "the cached weights, not a random draw"


def test_a_file_cached_as_absent_is_skipped_for_the_next_candidate(tmp_path, guarded, monkeypatch):
    """A file the hub lacks is recorded under ``.no_exist/``: the lookup goes on to ``pytorch_model.bin``."""
    go_offline("env", monkeypatch)
    cfg = timm.models.get_pretrained_cfg("test_vit")
    weights = timm.create_model("test_vit", pretrained=False, num_classes=cfg.num_classes).state_dict()
    snapshot = fake_cache(tmp_path / "hf", cfg.hf_hub_id)
    torch.save(weights, snapshot / "pytorch_model.bin")
    absent = snapshot.parents[1] / ".no_exist" / SHA
    absent.mkdir(parents=True)
    (absent / "model.safetensors").touch()
    model = backbones.create("test_vit", pretrained=True)
    assert guarded == [] and torch.equal(model.state_dict()["cls_token"], weights["cls_token"])


def test_cached_hf_clip_weights_and_config_load_offline(tmp_path, guarded, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from vpeft.backbones.clip import hf_config

    go_offline("no network", monkeypatch)
    torch.manual_seed(3)
    saved = transformers.CLIPModel(hf_config(64, 32, 2, 32, 8, 32))
    saved.save_pretrained(fake_cache(tmp_path / "hf", "org/tiny-clip"))
    clip = backbones.create("hf:org/tiny-clip", pretrained=True)
    for ours, theirs in ((clip.image, saved.vision_model), (clip.text, saved.text_model),
                         (clip.image_proj, saved.visual_projection)):  # fmt: skip
        mine = ours.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in theirs.state_dict().items()), "the cached weights"
    random = backbones.create("hf:org/tiny-clip", pretrained=False, img_size=16)  # only config.json is read
    assert random.image.embeddings.position_embedding.num_embeddings == (16 // 8) ** 2 + 1
    assert guarded == [], "transformers reads the cache with local_files_only"


def test_cached_open_clip_weights_load_offline(tmp_path, guarded, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    go_offline("env", monkeypatch)
    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    config = {"embed_dim": 32, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}
    (tmp_path / "vpeft-offline-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "vpeft-offline-tiny.json")
    tags = {("vpeft-offline-tiny", "tagged"): {"hf_hub": "org/tiny-open-clip/"}}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: tags.get((model, tag), {}))
    torch.manual_seed(5)
    weights = open_clip.create_model("vpeft-offline-tiny").state_dict()
    save_file(weights, str(fake_cache(tmp_path / "hf", "org/tiny-open-clip") / "open_clip_model.safetensors"))
    clip = backbones.create("open_clip:vpeft-offline-tiny", pretrained="tagged")
    assert guarded == []
    assert torch.equal(clip.image.conv1.weight, weights["visual.conv1.weight"])
    assert torch.equal(clip.logit_scale, weights["logit_scale"])
    tags[("vpeft-offline-tiny", "other")] = {"hf_hub": "org/not-cached/"}
    with pytest.raises(hub.HubOfflineError, match="'other' weights"):  # a tag of the model that is not cached
        backbones.create("open_clip:vpeft-offline-tiny", pretrained="other")
    with pytest.raises(backbones.ConfigError, match="has no pretrained tag 'nope'"):
        backbones.create("open_clip:vpeft-offline-tiny", pretrained="nope")
    assert guarded == []


# ---- random weights of hf: names ------------------------------------------------------------------------------
def test_random_hf_clip_vit_b16_builds_from_the_local_config_with_no_hub_call(guarded, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=0: pytest.fail("no hub file is needed"))
    clip = backbones.create("hf:openai/clip-vit-base-patch16", pretrained=False)
    assert guarded == []
    assert sum(p.numel() for p in clip.parameters()) == 149_620_737  # open_clip's ViT-B-16 (test_clip_counts.py)
    assert clip.image.config.hidden_act == "quick_gelu" and clip.image.config.patch_size == 16


def test_local_hf_configs_match_open_clips_model_configs():
    open_clip = pytest.importorskip("open_clip")
    from vpeft.backbones.clip.hf_configs import LOCAL_HF_CLIP

    twins = {
        "openai/clip-vit-base-patch32": "ViT-B-32",
        "openai/clip-vit-base-patch16": "ViT-B-16",
        "openai/clip-vit-large-patch14": "ViT-L-14",
        "openai/clip-vit-large-patch14-336": "ViT-L-14-336",
    }
    assert set(LOCAL_HF_CLIP) == set(twins)
    for repo, arch in twins.items():
        ours, theirs = LOCAL_HF_CLIP[repo], open_clip.get_model_config(arch)
        v, t, ov, ot = ours["vision_config"], ours["text_config"], theirs["vision_cfg"], theirs["text_cfg"]
        assert ours["projection_dim"] == theirs["embed_dim"], repo
        assert (v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"]) == (
            ov["image_size"], ov["patch_size"], ov["width"], ov["layers"]), repo  # fmt: skip
        assert v["num_attention_heads"] == ov["width"] // ov.get("head_width", 64)
        assert v["intermediate_size"] == ov["width"] * ov.get("mlp_ratio", 4.0)
        assert (t["hidden_size"], t["num_attention_heads"], t["num_hidden_layers"]) == (
            ot["width"], ot["heads"], ot["layers"]), repo  # fmt: skip
        assert (t["vocab_size"], t["max_position_embeddings"]) == (ot["vocab_size"], ot["context_length"])
        assert t["intermediate_size"] == 4 * ot["width"]


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_unknown_random_hf_name_offline_lists_the_local_configs(trigger, guarded, monkeypatch):
    pytest.importorskip("transformers")
    reason = go_offline(trigger, monkeypatch)
    with pytest.raises(hub.HubOfflineError) as err:
        build(trigger, "hf:someone/clip-x", pretrained=False)
    msg = str(err.value)
    assert "\n" not in msg and guarded == [] and reason in msg
    assert "config.json" in msg and all(f"hf:openai/clip-vit-{n}" in msg for n in ("base-patch16", "large-patch14"))


def test_random_timm_and_open_clip_names_never_ask_the_hub(guarded, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=0: pytest.fail("no hub file is needed"))
    backbones.create("test_vit", pretrained=False)
    backbones.create("open_clip:ViT-B-32", pretrained=False, img_size=32)
    assert guarded == []


# ---- detection ------------------------------------------------------------------------------------------------
def test_detection_is_one_short_connection_per_process_and_skipped_when_offline(monkeypatch):
    tries = []

    def connect(address, timeout=None):
        tries.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(hub, "_reachable", {})
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    assert hub.offline_reason() == "hub.example:8443 cannot be reached (no network)"
    assert hub.is_offline() and hub.is_offline()
    assert tries == [(("hub.example", 8443), 0.5)], "one connection test, 0.5 s, cached"
    monkeypatch.setenv("HF_ENDPOINT", "https://other.example")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub.offline_reason() == "TRANSFORMERS_OFFLINE=yes is set" and len(tries) == 1, "env: no connection test"
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    with hub.offline_mode():
        assert hub.offline_reason() == "--offline is set" and os.environ["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and len(tries) == 1
