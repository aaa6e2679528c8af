"""Roles -> targets: the one place that says which module (and which output rows of it) a method adapts.

A *role* names what a method wants to adapt in every block -- ``q``, ``k``, ``v`` (the attention's input
projections), ``qkv`` (all three as the attention's input projection), ``proj`` (attention output), ``fc1``,
``fc2`` (MLP), ``norm1``, ``norm2``, ``attn``, ``mlp``, ``block`` -- or, on CNNs, ``pw`` (pointwise channel
mixers: 1x1 convolutions and channel Linears) and ``kxk`` (k x k convolutions). :func:`resolve` turns roles
into :class:`Target` s: the qualified module name, the module, and for a fused projection the output rows the
role owns. The fused-versus-separate decision is made here once, for every method:

* timm fuses q, k, v into one ``qkv`` Linear: ``q`` is rows ``[0, d)`` of it, ``k`` ``[d, 2d)``, ``v``
  ``[2d, 3d)``; asking for ``q`` and ``v`` yields ONE target on ``qkv`` with two slices; ``qkv`` yields the
  whole module;
* Hugging Face models have separate ``q_proj``/``k_proj``/``v_proj`` Linears: ``q`` yields ``q_proj`` whole,
  and ``qkv`` yields the three projections (one target each, ``role="qkv"``, ``part`` naming the slice it is
  of the virtual fused projection).

Model-level facts live here too: :func:`input_size`, :func:`patch_grid`, :func:`final_norm`,
:func:`attention_layout` (how to recompute an attention layer with extra keys/values).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import ConfigError, UnsupportedBackboneError
from .family import get_spec
from .spec import ArchSpec, BlockParts

__all__ = [
    "QKV",
    "LINEAR_ROLES",
    "MODULE_ROLES",
    "CONV_ROLES",
    "BLOCK_ROLES",
    "ROLES",
    "Target",
    "AttentionLayout",
    "resolve",
    "target_names",
    "role_modules",
    "conv_modules",
    "check_roles",
    "input_size",
    "patch_grid",
    "final_norm",
    "attention_layout",
]

#: the attention's input projections, in the row order of a fused ``qkv``
QKV = ("q", "k", "v")
#: Linear roles of a transformer block, canonical order
LINEAR_ROLES = ("qkv", *QKV, "proj", "fc1", "fc2")
#: whole sub-modules of a block (``block`` last: wrapping it changes the path of everything inside)
MODULE_ROLES = ("norm1", "attn", "norm2", "mlp", "block")
BLOCK_ROLES = LINEAR_ROLES + MODULE_ROLES
#: CNN roles: pointwise (1x1, groups=1 convs and channel Linears) and k x k (k > 1, groups=1) convolutions
CONV_ROLES = ("pw", "kxk")
ROLES = BLOCK_ROLES + CONV_ROLES

_WHAT = {
    "qkv": "q/k/v projection (fused qkv or separate q, k, v Linears)",
    "q": "query projection",
    "k": "key projection",
    "v": "value projection",
    "proj": "attention output projection",
    "fc1": "MLP input projection (fc1)",
    "fc2": "MLP output projection (fc2)",
    "norm1": "pre-attention norm",
    "norm2": "pre-MLP norm",
    "attn": "attention module",
    "mlp": "single MLP module",
    "block": "block module",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """One module a method adapts.

    Attributes:
        role: the role asked for (``"q"``, ``"qkv"``, ``"fc1"``, ``"pw"``, ...). A fused qkv adapted for
            several of q, k, v is one target; its role is the first of them and ``parts`` lists them all.
        name: qualified module name in the model.
        module: the module itself (looked through vpeft wrappers).
        block: the block it belongs to ("" for CNN convolutions).
        index: the block's index (-1 for CNN convolutions).
        slices: output rows ``(start, stop)`` the role(s) own within a fused output; ``()``: the whole output.
        parts: the q/k/v parts this target stands for (``("q", "v")`` on a fused qkv; ``("k",)`` for a
            separate key projection that serves role ``qkv``); ``()`` for other roles.
    """

    role: str
    name: str
    module: nn.Module = dataclasses.field(compare=False, repr=False)
    block: str = ""
    index: int = -1
    slices: tuple[tuple[int, int], ...] = ()
    parts: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        """The module is a fused q/k/v projection (of which this target may own some rows only)."""
        return bool(self.slices) or (self.role == "qkv" and self.parts == QKV)

    @property
    def slice_list(self) -> list[tuple[int, int]] | None:
        """``slices`` as the list the slice-aware layers take (``None``: the whole output)."""
        return list(self.slices) or None


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """How to recompute one attention layer from its frozen sub-modules (see :mod:`vpeft.layers.kv_prompt`).

    Attributes:
        kind: ``"fused"`` (timm ``Attention``: ``qkv``, ``q_norm``/``k_norm``, ``norm``, ``gate``, ``proj``,
            returns a tensor) or ``"separate"`` (Hugging Face: ``q``/``k``/``v``/``out`` Linears, returns
            ``(output, weights)``).
        heads, head_dim: attention heads and their width.
        scale: the logit scale.
        dropout: attention-probability dropout (training only).
        q, k, v, out: attribute names of the projections inside the attention module (``q`` holds the fused
            projection for kind ``"fused"``; ``k``, ``v`` are then empty).
    """

    kind: str
    heads: int
    head_dim: int
    scale: float
    dropout: float
    q: str
    k: str = ""
    v: str = ""
    out: str = ""


def _in_head(name: str, head: str) -> bool:
    return bool(head) and (name == head or name.startswith(head + "."))


def conv_modules(model: nn.Module, spec: ArchSpec, role: str) -> list[str]:
    """Modules a CNN role names: ``pw`` (1x1 groups=1 convs, channel Linears), ``kxk`` (k > 1, groups=1)."""
    from ..layers.base import Wrapper

    names = []
    for name, m in model.named_modules():
        if _in_head(name, spec.head) or isinstance(m, Wrapper):
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            if (tuple(m.kernel_size) == (1, 1)) == (role == "pw"):
                names.append(name)
        elif isinstance(m, nn.Linear) and role == "pw":
            names.append(name)
    return names


def check_roles(roles, method: str = "", valid: tuple[str, ...] = ROLES) -> tuple[str, ...]:
    """``roles`` as a tuple; an unknown role raises ConfigError naming the valid roles."""
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    bad = [r for r in roles if r not in valid]
    if bad:
        who = f"{method}: " if method else ""
        raise ConfigError(f"{who}unknown role(s) {bad}; valid roles: {', '.join(valid)}")
    return roles


def _missing(method: str, spec: ArchSpec, parts: BlockParts, role: str) -> UnsupportedBackboneError:
    who = f"{method}: " if method else ""
    return UnsupportedBackboneError(
        f"{who}block {parts.block} of this {spec.arch} backbone has no {_WHAT.get(role, role)} (role {role!r})"
    )


def _module(model: nn.Module, name: str) -> nn.Module | None:
    return model.get_submodule(name) if name else None


def _linear_of(model: nn.Module, name: str) -> nn.Linear | None:
    module = _module(model, name)
    return module if isinstance(module, nn.Linear) else None


def _qkv_plan(spec: ArchSpec, p: BlockParts, roles, method: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """The q/k/v decision, made once for every method: ``(role, module name, q/k/v parts)`` entries."""
    whole = "qkv" in roles
    wanted = QKV if whole else tuple(t for t in QKV if t in roles)
    if not wanted:
        return []
    if p.qkv:  # fused (the builders name a qkv only when it is one Linear): one module, a slice per part
        return [("qkv" if whole else wanted[0], p.qkv, wanted)]
    missing = [t for t in wanted if not getattr(p, t)]
    if missing:
        raise _missing(method, spec, p, "qkv" if whole else missing[0])
    return [("qkv" if whole else t, getattr(p, t), (t,)) for t in wanted]


def _block_plan(spec: ArchSpec, p: BlockParts, roles, method: str) -> list[tuple[str, str, tuple[str, ...]]]:
    out = _qkv_plan(spec, p, roles, method)
    for role in ("proj", "fc1", "fc2", *MODULE_ROLES):
        if role in roles:
            if not getattr(p, role):
                raise _missing(method, spec, p, role)
            out.append((role, getattr(p, role), ()))
    return out


def target_names(spec: ArchSpec, roles, *, method: str = "") -> list[tuple[str, str]]:
    """``(role, module name)`` of the targets :func:`resolve` returns, in the same order, from the spec alone."""
    roles = check_roles(roles, method, BLOCK_ROLES)
    return [(role, name) for p in spec.parts for role, name, _ in _block_plan(spec, p, roles, method)]


def _target(model: nn.Module, spec: ArchSpec, i: int, p: BlockParts, entry, method: str) -> Target:
    role, name, parts = entry
    module = model.get_submodule(name)
    if role in LINEAR_ROLES and not isinstance(module, nn.Linear):
        raise _missing(method, spec, p, role)
    slices: tuple[tuple[int, int], ...] = ()
    if name == p.qkv and role != "qkv":  # q, k and/or v: their rows of a fused qkv (each its own slice)
        width = module.out_features // 3
        slices = tuple((QKV.index(t) * width, (QKV.index(t) + 1) * width) for t in parts)
    return Target(role, name, module, p.block, i, slices, parts)


def resolve(model: nn.Module, spec: ArchSpec, roles, *, method: str = "") -> list[Target]:
    """The targets of ``roles`` in ``model``, block by block in canonical role order (CNNs: role by role).

    Raises:
        ConfigError: an unknown role (the message lists the valid ones).
        UnsupportedBackboneError: a role of the other backbone kind (block roles on a CNN, ``pw``/``kxk`` on a
            transformer), or a block without the role (the message names the role, the block and the backbone).
    """
    roles = check_roles(roles, method)
    who = f"{method}: " if method else ""
    if spec.kind == "cnn":
        wrong = [r for r in roles if r not in CONV_ROLES]
        if wrong:
            raise UnsupportedBackboneError(
                f"{who}targets {wrong} do not exist on {spec.arch} (cnn) backbones; use targets from {list(CONV_ROLES)}"
            )
        return [
            Target(r, n, model.get_submodule(n)) for r in CONV_ROLES if r in roles for n in conv_modules(model, spec, r)
        ]
    wrong = [r for r in roles if r in CONV_ROLES]
    if wrong:
        raise UnsupportedBackboneError(
            f"{who}targets {wrong} do not exist on {spec.arch} ({spec.kind}) backbones (CNN roles); use targets "
            f"from {list(BLOCK_ROLES)}"
        )
    if not spec.parts:
        raise UnsupportedBackboneError(f"{who}{spec.arch} has no transformer blocks to adapt")
    return [
        _target(model, spec, i, p, entry, method)
        for i, p in enumerate(spec.parts)
        for entry in _block_plan(spec, p, roles, method)
    ]


def role_modules(model: nn.Module, spec: ArchSpec) -> dict[str, list[str]]:
    """Every role that names whole modules here -> those modules (for name-based tools such as HF PEFT).

    A fused qkv appears under ``"qkv"`` only (its q/k/v are slices, not modules); separate projections under
    ``"q"``, ``"k"``, ``"v"``, and ``"qkv"`` lists all three. CNNs: ``pw`` and ``kxk``.
    """
    if spec.kind == "cnn":
        return {r: conv_modules(model, spec, r) for r in CONV_ROLES}
    out: dict[str, list[str]] = {}
    for p in spec.parts:
        fused = bool(p.qkv)
        for role in ("qkv", *QKV, "proj", "fc1", "fc2"):
            if role == "qkv":
                names = [p.qkv] if fused else [getattr(p, t) for t in QKV if getattr(p, t)]
            elif role in QKV:
                names = [] if fused else [getattr(p, role)] if getattr(p, role) else []
            else:
                names = [getattr(p, role)] if _linear_of(model, getattr(p, role)) is not None else []
            if names:
                out.setdefault(role, []).extend(names)
    return out


# ---- model-level facts ------------------------------------------------------------------------------------------
def _pair_or_none(size) -> tuple[int, int] | None:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) for s in size):
        return int(size[-2] if len(size) > 1 else size[0]), int(size[-1])
    return None


def input_size(model: nn.Module, override: int | None = None) -> tuple[int, int]:
    """``(h, w)`` of the images ``model`` expects: ``override`` if given, else the size the backbone was built
    for (its ArchSpec: timm ``patch_embed.img_size``, a Hugging Face ``config.image_size``), else timm's
    ``pretrained_cfg["input_size"]``, else 224 x 224 (timm's default)."""
    if override is not None:
        return int(override), int(override)
    inner = getattr(model, "backbone", None)  # a task model (vpeft.tasks.TaskModel) around a backbone
    if isinstance(inner, nn.Module) and not hasattr(model, "patch_embed"):
        return input_size(inner)
    try:
        size = get_spec(model).image_size
    except UnsupportedBackboneError:
        size = (0, 0)
    if all(size):
        return size
    built = _pair_or_none(getattr(getattr(model, "patch_embed", None), "img_size", None))
    if built is not None:
        return built
    cfg = _pair_or_none((getattr(model, "pretrained_cfg", None) or {}).get("input_size"))
    return cfg if cfg is not None else (224, 224)


def patch_grid(spec: ArchSpec) -> tuple[int, int] | None:
    """The patch grid ``(h, w)`` of a ViT at the size it was built for (None when unknown)."""
    if spec.kind == "cnn" or not all(spec.image_size) or not all(spec.patch_size):
        return None
    return spec.image_size[0] // spec.patch_size[0], spec.image_size[1] // spec.patch_size[1]


def final_norm(spec: ArchSpec) -> str:
    """The module normalising the whole token sequence after the last block ("" when there is none)."""
    return spec.final_norm


def attention_layout(model: nn.Module, spec: ArchSpec, parts: BlockParts) -> AttentionLayout:
    """How to recompute ``parts.attn`` with extra keys/values; UnsupportedBackboneError where vpeft cannot."""
    attn = model.get_submodule(parts.attn) if parts.attn else None
    if parts.attention == "fused":
        qkv = getattr(attn, "qkv", None)
        heads = int(attn.num_heads)
        return AttentionLayout(
            "fused", heads, qkv.out_features // 3 // heads, float(attn.scale), float(attn.attn_drop.p), "qkv",
            out="proj",
        )  # fmt: skip
    if parts.attention == "separate":
        # the attention's own children (the outermost module: wrappers of other methods keep acting)
        rel = {t: getattr(parts, t)[len(parts.attn) + 1 :].split(".")[0] for t in (*QKV, "proj")}
        heads = int(getattr(attn, "num_attention_heads", None) or attn.num_heads)
        head_dim = int(attn.head_dim)
        scale = getattr(attn, "scaling", None) or getattr(attn, "scale", None) or head_dim**-0.5
        dropout = getattr(attn, "attention_dropout", None)
        dropout = getattr(attn, "dropout", 0.0) if dropout is None else dropout
        return AttentionLayout("separate", heads, head_dim, float(scale), float(dropout), rel["q"], rel["k"], rel["v"],
                               rel["proj"])  # fmt: skip
    raise UnsupportedBackboneError(
        f"{parts.attn or 'the attention of ' + parts.block} is a {type(attn).__name__}, no attention layer vpeft can "
        f"recompute with extra keys/values on this {spec.arch} backbone (supported: timm vision_transformer."
        "Attention with a fused qkv, and Hugging Face attention with q/k/v/output projections as direct children)"
    )
