"""Many tasks on one backbone: a mixed batch matches each task's own single-task model, sample by sample."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import NUM_CLASSES, TINY_BACKBONES, batch, forward, supports
from torch import nn

import vpeft
from vpeft import registry
from vpeft._modules import set_module
from vpeft.api import read_delta
from vpeft.layers import LoRALinear, ParallelAdapter, PromptedBlock, ScaleShift, SequentialAdapter, Wrapper
from vpeft.layers.base import has_task_delta
from vpeft.layers.dora import DoRALinear
from vpeft.methods.base import REPARAMETER, Method
from vpeft.multitask import SELECTIONS, MultiTaskLayer, MultiTaskModel, supported_methods

# (method, options, number of classes of the task's head): different ranks, targets and head sizes together
TASKS = {
    "lora_qv": ("lora", {"r": 4, "targets": ["q", "v"]}, 3),
    "lora_wide": ("lora", {"r": 2, "alpha": 4.0, "targets": ["qkv", "proj", "fc1", "fc2"]}, 7),
    "lora_k": ("lora", {"r": 1, "targets": ["k"]}, NUM_CLASSES),
    "adapter": ("adapter", {"placement": "houlsby", "bottleneck": 4, "act": "relu"}, 5),
    "adaptformer": ("adaptformer", {"bottleneck": 6, "scale": 0.5}, 2),
    "linear": ("linear", {}, 4),
    "ssf": ("ssf", {}, 6),
}


def fresh(backbone: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    model = TINY_BACKBONES[backbone][0]()
    if num_classes != NUM_CLASSES:
        model.reset_classifier(num_classes)
    return model.eval()


def train_delta(backbone: str, task: str, method: str, options: dict, classes: int, seed: int, path) -> nn.Module:
    """A 'trained' single-task model (random non-zero delta) saved to ``path``; returns it in eval mode."""
    model = fresh(backbone, classes)
    vpeft.apply(model, method, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    vpeft.save(model, path)
    return model.eval()


def setup(tmp_path, backbone: str = "vit_cls", tasks: dict | None = None):
    """Delta files and their single-task reference models (loaded from the files onto fresh backbones)."""
    tasks = TASKS if tasks is None else tasks
    paths, refs = {}, {}
    for seed, (task, (method, options, classes)) in enumerate(tasks.items()):
        paths[task] = tmp_path / f"{task}.safetensors"
        train_delta(backbone, task, method, options, classes, seed, paths[task])
        refs[task] = fresh(backbone, classes)
        vpeft.load(refs[task], paths[task])
        refs[task].eval()
    return paths, refs


def check_against_refs(out, refs, x, ids, tasks, atol=1e-5):
    for t, task in enumerate(tasks):
        rows = (ids == t).nonzero().flatten()
        assert torch.equal(out.index[task], rows), "rows of a task must come in batch order"
        with torch.inference_mode():
            expected = forward(refs[task], x)[rows]
        assert out.logits[task].shape == expected.shape
        torch.testing.assert_close(out.logits[task], expected, atol=atol, rtol=0)
    per_sample = out.per_sample()
    assert len(per_sample) == x.shape[0]
    for i, t in enumerate(ids.tolist()):
        with torch.inference_mode():
            torch.testing.assert_close(per_sample[i], forward(refs[tasks[t]], x[i : i + 1])[0], atol=atol, rtol=0)


@pytest.mark.parametrize("selection", ["grouped", "gather"])
def test_mixed_batch_matches_each_task_model(tmp_path, selection):
    paths, refs = setup(tmp_path)
    tasks = list(TASKS)
    mt = MultiTaskModel.from_deltas(fresh("vit_cls"), paths, selection=selection)
    assert mt.tasks == tuple(tasks) and mt.num_classes["lora_wide"] == 7 and not mt.training
    ids = torch.arange(2 * len(tasks)) % len(tasks)
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]  # interleaved tasks
    x = batch(32, n=len(ids))
    with torch.inference_mode():
        out = mt(x, ids)
    check_against_refs(out, refs, x, ids, tasks)
    with torch.inference_mode():  # task names give the same result
        by_name = mt(x, [tasks[i] for i in ids.tolist()])
    for task in tasks:
        torch.testing.assert_close(by_name.logits[task], out.logits[task], atol=0, rtol=0)


@pytest.mark.parametrize(
    "backbone,selection", [("vit_reg_ls", "grouped"), ("swin", "grouped"), ("swin", "gather"), ("hf_vit", "grouped")]
)
def test_other_backbones(tmp_path, backbone, selection):
    """Register tokens + layer scale, Swin (windows: several rows per sample), Hugging Face (separate q/k/v)."""
    keep = {k: v for k, v in TASKS.items() if supports(v[0], v[1], backbone)}
    if backbone == "hf_vit":  # no reset_classifier: every head keeps the backbone's classes
        keep = {k: (m, o, NUM_CLASSES) for k, (m, o, _) in keep.items()}
    assert {"lora_qv", "ssf", "linear"} <= set(keep)
    paths, refs = setup(tmp_path, backbone, keep)
    tasks = list(keep)
    mt = MultiTaskModel.from_deltas(fresh(backbone), paths, selection=selection)
    ids = (torch.arange(len(tasks) + 2) * 3) % len(tasks)
    x = batch(TINY_BACKBONES[backbone][1], n=len(ids))
    with torch.inference_mode():
        out = mt(x, ids)
    check_against_refs(out, refs, x, ids, tasks)


def test_tasks_without_samples_and_sorted_batch(tmp_path):
    tasks = {k: TASKS[k] for k in ("lora_qv", "adapter", "linear", "ssf")}
    paths, refs = setup(tmp_path, tasks=tasks)
    mt = MultiTaskModel.from_deltas(fresh("vit_cls"), paths)
    ids = torch.tensor([3, 1, 1, 3, 3])  # tasks 0 and 2 absent
    x = batch(32, n=5)
    with torch.inference_mode():
        out = mt(x, ids)
    assert out.logits["lora_qv"].shape == (0, 3) and out.index["linear"].numel() == 0
    check_against_refs(out, refs, x, ids, list(tasks))
    ids = torch.tensor([0, 0, 1, 2, 3])  # already in task order: no reordering copy
    with torch.inference_mode():
        check_against_refs(mt(x, ids), refs, x, ids, list(tasks))
    with torch.inference_mode():  # one task only
        check_against_refs(mt(x, torch.full((5,), 2)), refs, x, torch.full((5,), 2), list(tasks))


def test_headless_backbone(tmp_path):
    """A backbone created without a head (num_classes=0) takes deltas trained with heads."""
    tasks = {k: TASKS[k] for k in ("lora_qv", "linear")}
    paths, refs = setup(tmp_path, tasks=tasks)
    mt = MultiTaskModel.from_deltas(fresh("vit_cls", 0), paths)
    assert mt.num_classes == {"lora_qv": 3, "linear": 4}
    ids = torch.tensor([1, 0, 0, 1])
    x = batch(32, n=4)
    with torch.inference_mode():
        check_against_refs(mt(x, ids), refs, x, ids, list(tasks))


def test_deltas_in_memory_and_adapted_models(tmp_path):
    tasks = {k: TASKS[k] for k in ("lora_qv", "adaptformer")}
    paths, refs = setup(tmp_path, tasks=tasks)
    mt = MultiTaskModel.from_deltas(
        fresh("vit_cls"), {"lora_qv": read_delta(paths["lora_qv"]), "adaptformer": refs["adaptformer"]}
    )
    ids = torch.tensor([1, 0, 1])
    x = batch(32, n=3)
    with torch.inference_mode():
        check_against_refs(mt(x, ids), refs, x, ids, list(tasks))


def test_backbone_weights_are_shared_not_copied(tmp_path):
    paths, _ = setup(tmp_path)
    backbone = fresh("vit_cls")
    head = set(map(id, backbone.get_classifier().parameters()))
    shared = {p.data_ptr(): p for p in backbone.parameters() if id(p) not in head}
    mt = MultiTaskModel.from_deltas(backbone, paths)
    params = list(mt.parameters())
    assert all(not p.requires_grad for p in params)
    ptrs = [p.data_ptr() for p in params]
    assert len(ptrs) == len(set(ptrs)), "a tensor is registered twice"
    assert set(shared) <= set(ptrs)
    assert all(any(q is p for q in params) for p in shared.values()), "the backbone's own tensors are used"
    delta_numel = sum(t.numel() for path in paths.values() for t in read_delta(path)[1].values())
    assert sum(p.numel() for p in mt.delta_parameters()) == delta_numel
    assert sum(p.numel() for p in params) == sum(p.numel() for p in shared.values()) + delta_numel


def test_eval_inference_mode_and_unload(tmp_path):
    tasks = {k: TASKS[k] for k in ("lora_wide", "adapter", "ssf")}
    paths, refs = setup(tmp_path, tasks=tasks)
    backbone = fresh("vit_cls")
    x = batch(32, n=3)
    with torch.inference_mode():
        plain = backbone(x)
    mt = MultiTaskModel.from_deltas(backbone, paths)
    assert sum(isinstance(m, MultiTaskLayer) for m in mt.modules()) > 0
    ids = torch.tensor([2, 0, 1])
    with torch.inference_mode():
        out = mt(x, ids)
        assert all(t.is_inference() for t in out.logits.values())
        features = backbone(x)  # outside a multi-task forward: the frozen backbone, without its head
    check_against_refs(out, refs, x, ids, list(tasks))
    assert features.shape == (3, 32)
    assert mt.unload() is backbone
    assert not any(isinstance(m, MultiTaskLayer) for m in backbone.modules())
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), plain, atol=0, rtol=0)
    with pytest.raises(vpeft.ConfigError, match="unloaded"):
        mt(x, ids)


def test_wrong_backbone_weights_are_refused(tmp_path):
    paths, _ = setup(tmp_path, tasks={"lora_qv": TASKS["lora_qv"]})
    other = fresh("vit_cls")
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.mul_(1.01)
    with pytest.raises(vpeft.CheckpointError, match=r"lora_qv.safetensors' belongs to other weights.*fingerprint"):
        MultiTaskModel.from_deltas(other, paths)
    with pytest.raises(vpeft.CheckpointError, match=r"trained on backbone 'vit_tiny_patch16_224', not"):
        MultiTaskModel.from_deltas(fresh("vit_reg_ls"), paths)


def test_unsupported_method_is_named(tmp_path):
    paths, _ = setup(tmp_path, tasks={"lora_qv": TASKS["lora_qv"], "prompts": ("vpt_deep", {"num_tokens": 2}, 5)})
    backbone = fresh("vit_cls")
    with pytest.raises(
        vpeft.ConfigError,
        match=r"task 'prompts': method 'vpt_deep' cannot be selected per sample \(its PromptedBlock at blocks.0 has no "
        r"per-sample form.*\); supported methods: adapter, adaptformer, linear, lora, ssf$",
    ):
        MultiTaskModel.from_deltas(backbone, paths)
    assert not any(isinstance(m, vpeft.layers.Wrapper) for m in backbone.modules()), "a refused load leaves no trace"


def test_bad_arguments(tmp_path):
    paths, _ = setup(tmp_path, tasks={"lora_qv": TASKS["lora_qv"], "linear": TASKS["linear"]})
    with pytest.raises(vpeft.ConfigError, match=r"selection='bmm' is invalid; valid options: grouped, gather"):
        MultiTaskModel.from_deltas(fresh("vit_cls"), paths, selection="bmm")
    adapted = fresh("vit_cls")
    vpeft.apply(adapted, "lora")
    with pytest.raises(vpeft.ConfigError, match="already holds vpeft wrappers"):
        MultiTaskModel.from_deltas(adapted, paths)
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"supports vit/swin backbones"):
        MultiTaskModel.from_deltas(fresh("cnn_effnet"), paths)
    mt = MultiTaskModel.from_deltas(fresh("vit_cls"), paths)
    x = batch(32, n=2)
    with pytest.raises(vpeft.ConfigError, match=r"task id 2 is out of range; valid ids: 0=lora_qv, 1=linear"):
        mt(x, torch.tensor([0, 2]))
    with pytest.raises(vpeft.UnknownNameError, match=r"unknown task 'lora'.*Valid tasks: linear, lora_qv"):
        mt(x, ["lora", "linear"])
    with pytest.raises(vpeft.ConfigError, match=r"task_ids has 3 entries for a batch of 2"):
        mt(x, [0, 1, 1])


# ---- the layer protocol: support is found from the registry and the layers, not from a list ------------------
def test_every_supported_method_is_covered_and_matches_its_model(tmp_path):
    """Every method the protocol finds selectable (with its default config) next to a LoRA task, both selections,
    against the task's separately loaded model within 1e-5; and the fixed task set above covers all of them."""
    supported = supported_methods(fresh("vit_cls"))
    assert set(supported) == {m for m, _, _ in TASKS.values()}, "TASKS must cover every supported method"
    for i, method in enumerate(supported):
        tasks = {method: (method, {}, 3 + i), "lora_qv": TASKS["lora_qv"]}
        paths, refs = setup(tmp_path / method, tasks=tasks)
        ids = torch.tensor([0, 1, 1, 0, 1])
        x = batch(32, n=len(ids))
        for selection in SELECTIONS:
            mt = MultiTaskModel.from_deltas(fresh("vit_cls"), paths, selection=selection)
            with torch.inference_mode():
                check_against_refs(mt(x, ids), refs, x, ids, list(tasks))


@pytest.mark.parametrize(
    "tasks", [["lora_qv", "lora_k"], ["lora_qv", "adapter", "ssf", "linear"]], ids=["lora", "mixed"]
)
def test_supported_methods_of_a_backbone_a_multitask_model_holds(tmp_path, tasks):
    """Asked of a backbone a MultiTaskModel was built on, the answer is the plain backbone's, and neither the
    backbone nor the model changes (LoRA-only and mixed sets: their layers' base layers are released)."""
    chosen = {t: TASKS[t] for t in tasks}
    paths, refs = setup(tmp_path, tasks=chosen)
    backbone = fresh("vit_cls")
    plain = supported_methods(backbone)
    mt = MultiTaskModel.from_deltas(backbone, paths)
    layers = {n for n, m in backbone.named_modules() if isinstance(m, MultiTaskLayer)}
    assert layers
    assert supported_methods(backbone) == plain
    assert supported_methods(mt.backbone) == plain
    assert {n for n, m in backbone.named_modules() if isinstance(m, MultiTaskLayer)} == layers
    ids = torch.tensor([0, 1, 1, 0] + list(range(len(tasks))))
    x = batch(32, n=len(ids))
    with torch.inference_mode():
        check_against_refs(mt(x, ids), refs, x, ids, tasks)
    plain_backbone = mt.unload()  # the original head is back after unload, the answer unchanged
    assert supported_methods(plain_backbone) == plain
    assert isinstance(plain_backbone.head, nn.Linear) and plain_backbone.head.out_features == NUM_CLASSES


def test_protocol_is_found_on_the_layer_classes():
    lin = nn.Linear(4, 6)
    assert has_task_delta(LoRALinear(lin, 2, 2.0)) and has_task_delta(ScaleShift(lin))
    assert has_task_delta(SequentialAdapter(lin, 6, 2)) and has_task_delta(ParallelAdapter(lin, 4, 2))
    # DoRA changes LoRA's forward without its own apply_delta: not per-sample; prompts change the tokens
    assert not has_task_delta(DoRALinear(lin, 2, 2.0)) and not has_task_delta(lin)
    assert not has_task_delta(PromptedBlock(lin, 1, 0, 2, 4, 0.1, strip=False))
    lin = nn.Linear(6, 6)  # a parallel adapter needs equal widths
    x = torch.randn(3, 5, 6)
    for layer in (LoRALinear(lin, 2, 2.0), ScaleShift(lin), SequentialAdapter(lin, 6, 2), ParallelAdapter(lin, 6, 2)):
        _randomise(layer)
        with torch.no_grad():  # the protocol: forward(x) == apply_delta(x, base(x))
            torch.testing.assert_close(layer.apply_delta(x, lin(x)), layer(x), atol=1e-6, rtol=0)


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("base_layer."):
                p.add_(torch.randn_like(p) * 0.1)


class ChannelShift(Wrapper):
    """A toy mergeable layer written only against the protocol: ``y = f(x) + beta`` per output channel."""

    mergeable = True

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.beta = nn.Parameter(torch.zeros(base_layer.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.beta

    def apply_delta(self, x, y):
        return y.add_(self.beta)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.base_layer.bias.add_(self.beta)


@dataclasses.dataclass(frozen=True)
class ChannelShiftConfig(vpeft.MethodConfig):
    method = "toy_channel_shift"


class ChannelShiftMethod(Method):
    config_cls = ChannelShiftConfig
    family = REPARAMETER
    paper = "a test"
    mergeable = True

    def inject(self, model: nn.Module, spec) -> list[str]:
        names = [p.proj for p in spec.parts]
        for name in names:
            set_module(model, name, ChannelShift(model.get_submodule(name)))
        return names


def test_a_new_layer_class_is_multi_task_capable_without_editing_multitask(tmp_path, request):
    registry.register_method(ChannelShiftMethod)
    request.addfinalizer(lambda: registry.METHODS.unregister("toy_channel_shift"))  # the registration is undone
    assert "toy_channel_shift" in supported_methods(fresh("vit_cls"))
    tasks = {"toy": ("toy_channel_shift", {}, 5), "lora_qv": TASKS["lora_qv"], "ssf": TASKS["ssf"]}
    paths, refs = setup(tmp_path, tasks=tasks)
    ids = torch.tensor([0, 1, 2, 0, 0, 2])
    x = batch(32, n=len(ids))
    for selection in SELECTIONS:  # gather: a class without stack_deltas is applied task group by task group
        mt = MultiTaskModel.from_deltas(fresh("vit_cls"), paths, selection=selection)
        assert isinstance(mt.backbone.blocks[0].attn.proj.parts["0"], ChannelShift)
        with torch.inference_mode():
            check_against_refs(mt(x, ids), refs, x, ids, list(tasks))


def test_tensors_that_do_not_fit_are_refused(tmp_path):
    """The shared fit check (vpeft.state.check_fit) runs on every task's tensors."""
    paths, _ = setup(tmp_path, tasks={"lora_qv": TASKS["lora_qv"]})
    meta, tensors = read_delta(paths["lora_qv"])
    key = next(k for k in tensors if "lora_A" in k)
    bad = {**tensors, key: tensors[key][:1]}
    with pytest.raises(vpeft.CheckpointError, match=rf"checkpoint \"task 'lora_qv'\": {key} has shape \(1, 32\)"):
        MultiTaskModel.from_deltas(fresh("vit_cls"), {"lora_qv": (meta, bad)})
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(vpeft.CheckpointError, match=rf"does not fit: missing \['{key}'\]"):
        MultiTaskModel.from_deltas(fresh("vit_cls"), {"lora_qv": (meta, missing)})
