"""Model hubs without a network: decide *before* any hub call, load what the local cache holds, refuse in one line.

timm, open_clip and transformers download weights (and Hugging Face configs) from the Hugging Face hub. Without
a network their HTTP clients retry for about a minute and log dozens of warnings before failing. vpeft asks here
first, in this order:

1. :func:`offline_reason`: the hub counts as offline when ``--offline`` is given (:func:`offline_mode`), when
   ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value, or when a TCP connection to the hub's
   host (``$HF_ENDPOINT``, default ``huggingface.co``, port 443) cannot be opened within
   :data:`CONNECT_TIMEOUT_S` seconds. The connection test runs at most once per host and process, and never when
   offline mode is set.
2. Offline, the files a library would download are looked up in the local Hugging Face cache with
   ``huggingface_hub.try_to_load_from_cache`` (:func:`cached_file`); the builders in :mod:`vpeft.backbones` then
   load them from there without a hub call (timm: the cached file as ``pretrained_cfg_overlay={"file": ...}``;
   open_clip: the cached file as ``pretrained``; transformers: ``local_files_only=True``).
3. Nothing cached: :class:`HubOfflineError`, one line naming what is missing, why the hub is offline and how to
   use local weights instead (:func:`refusal`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ConfigError, VpeftError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_ENDPOINT",
    "OFFLINE_ENV",
    "OFFLINE_FLAG",
    "HubOfflineError",
    "cached_file",
    "hub_cache_dir",
    "hub_host",
    "hub_reachable",
    "is_offline",
    "offline_mode",
    "offline_reason",
    "refusal",
    "hf_cached",
    "open_clip_cached",
    "safe_alternatives",
    "timm_offline",
]

OFFLINE_ENV = "HF_HUB_OFFLINE"
"""The environment variable that puts huggingface_hub (and vpeft) offline."""
OFFLINE_FLAG = "--offline"
"""The CLI flag of the same meaning."""
DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 0.5
"""Seconds the connection test waits for the hub's host."""

_TRUE = ("1", "true", "yes", "on")
_reachable: dict[tuple[str, int], bool] = {}  # per process: (host, port) -> could connect
_forced: list[bool] = []  # a stack: offline_mode(True) pushes True


class HubOfflineError(VpeftError):
    """A hub file is needed, the hub is offline and the local cache does not hold the file."""


def hub_host() -> tuple[str, int]:
    """``(host, port)`` of the hub endpoint (``$HF_ENDPOINT``, default ``https://huggingface.co``)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds (tested once per process)."""
    key = hub_host()
    if key not in _reachable:
        try:
            with socket.create_connection(key, timeout=timeout):
                _reachable[key] = True
        except OSError:  # DNS failure, refused, unreachable, timed out
            _reachable[key] = False
    return _reachable[key]


def _env_offline() -> str | None:
    for var in (OFFLINE_ENV, "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    return None


def offline_reason() -> str | None:
    """Why the hub is offline (``"--offline is set"``, ``"HF_HUB_OFFLINE=1 is set"``, ``"huggingface.co:443 cannot
    be reached"``), or None when it can be used. Only the last case opens a connection (once per process)."""
    if any(_forced):
        return f"{OFFLINE_FLAG} is set"
    reason = _env_offline()
    if reason is not None:
        return reason
    if not hub_reachable():
        host, port = hub_host()
        return f"{host}:{port} cannot be reached (no network)"
    return None


def is_offline() -> bool:
    """Whether the hub cannot be used (see :func:`offline_reason`)."""
    return offline_reason() is not None


@contextlib.contextmanager
def offline_mode(on: bool = True) -> Iterator[None]:
    """Treat the hub as offline inside the block (``--offline``); ``HF_HUB_OFFLINE=1`` is set for its duration, so
    libraries imported inside it stay off the network too. ``on=False`` changes nothing."""
    if not on:
        yield
        return
    before = os.environ.get(OFFLINE_ENV)
    _forced.append(True)
    os.environ[OFFLINE_ENV] = "1"
    try:
        yield
    finally:
        _forced.pop()
        if before is None:
            os.environ.pop(OFFLINE_ENV, None)
        else:
            os.environ[OFFLINE_ENV] = before


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The Hugging Face cache folder files are looked up in (``cache_dir``, else huggingface_hub's default)."""
    if cache_dir is not None:
        return str(Path(cache_dir).expanduser())
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def safe_alternatives(filename: str) -> list[str]:
    """The names a library tries for ``filename``, in its order: the safetensors twin first (``model.safetensors``
    for ``pytorch_model.bin``, ``x.safetensors`` for ``x.bin`` / ``x.pth``), then the file itself."""
    stem, ext = os.path.splitext(filename)
    twins = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    twin = twins.get(filename) or (stem + ".safetensors" if ext in (".bin", ".pth") else None)
    return [twin, filename] if twin else [filename]


def cached_file(
    repo_id: str,
    filenames: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> str | None:
    """The local path of the first of ``filenames`` of ``repo_id`` in the Hugging Face cache, or None (no hub call:
    ``huggingface_hub.try_to_load_from_cache``)."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        path = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache_dir(cache_dir), revision=revision)
        if isinstance(path, str):  # None: not cached; a sentinel object: cached as absent on the hub
            return path
    return None


def refusal(name: str, missing: str, reason: str, local: str, cache_dir: str | os.PathLike[str] | None = None):
    """The one-line :class:`HubOfflineError` for a hub file needed offline: ``missing`` names the file(s),
    ``local`` the local-weights alternative for this kind of name."""
    return HubOfflineError(
        f"backbone {name!r}: {missing} not in the local Hugging Face cache ({hub_cache_dir(cache_dir)}) and the hub "
        f"is offline ({reason}); to use local weights, fill that cache once with a network, or {local}; or use "
        "random weights (--no-pretrained / pretrained=False)"
    )


# ---- the three libraries ----------------------------------------------------------------------------------------
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def timm_offline(
    name: str, pretrained: bool, cache_dir: str | os.PathLike[str] | None, local: str
) -> tuple[str, dict[str, Any]]:
    """``(name, extra create_model kwargs)`` that let ``timm.create_model`` build ``name`` without a hub call.

    Online, or for a build that needs no hub file (random weights of a registry name, a ``local-dir:`` name, a
    tag timm has no weights for), ``(name, {})``. Offline, a cached weights file is passed as
    ``pretrained_cfg_overlay={"file": path}`` (the hub's copy, or torch hub's copy of a URL checkpoint); an
    ``hf-hub:`` name becomes timm's ``local-dir:`` of its cached snapshot (``config.json`` and weights). Nothing
    cached: :class:`HubOfflineError` (``local``: the local ways to name in the message).
    """
    import timm.models

    source, model_id = timm.models.parse_model_name(name)
    if source == "local-dir" or (source is None and not pretrained):
        return name, {}
    reason = offline_reason()
    if reason is None:
        return name, {}
    if source == "hf-hub":
        repo, _, revision = model_id.partition("@")
        config = cached_file(repo, ["config.json"], revision=revision or None, cache_dir=cache_dir)
        weights = cached_file(repo, _HF_WEIGHTS, revision=revision or None, cache_dir=cache_dir) if pretrained else ""
        if config is None or weights is None:
            what = "config.json and weights" if pretrained else "config.json"
            raise refusal(
                name,
                f"the {what} of hub repo {repo!r} are",
                reason,
                f"name timm's local-dir:FOLDER (its config.json and weights) {local}",
                cache_dir,
            )
        return f"local-dir:{os.path.dirname(config)}", {}
    cfg = timm.models.get_pretrained_cfg(model_id)
    if cfg is None or cfg.file or cfg.state_dict:  # no weights to fetch, or already local
        return name, {}
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = safe_alternatives(cfg.hf_hub_filename or "pytorch_model.bin")
        path = cached_file(repo, names, revision=revision or None, cache_dir=cache_dir)
        if path is not None:  # a hub file is a state dict, even where timm's URL checkpoint needs a custom loader
            return name, {"pretrained_cfg_overlay": {"file": path, "custom_load": cfg.custom_load == "hf"}}
    if cfg.url:
        import torch.hub

        folder = Path(cache_dir).expanduser() if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
        path = folder / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return name, {"pretrained_cfg_overlay": {"file": str(path)}}
    where = " / ".join(x for x in (cfg.hf_hub_id and f"hub repo {cfg.hf_hub_id!r}", cfg.url) if x)
    raise refusal(
        name,
        f"the pretrained weights of {cfg.architecture}.{cfg.tag} ({where}) are",
        reason,
        f"name timm's local-dir:FOLDER (config.json and weights) {local}",
        cache_dir,
    )


def open_clip_cached(name: str, model: str, tag: str, cache_dir: str | None = None) -> str | None:
    """Offline, the local path of open_clip ``model``'s weights for pretrained ``tag`` (the hub's cached copy, or
    open_clip's own download of a URL checkpoint in ``~/.cache/clip``); online, or when ``tag`` is a file, None
    (open_clip then loads as usual). Offline with nothing cached: :class:`HubOfflineError`."""
    if os.path.isfile(tag):
        return None
    reason = offline_reason()
    if reason is None:
        return None
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ConfigError(
            f"open_clip model {model!r} has no pretrained tag {tag!r}; its tags: {', '.join(tags) or '(none)'}"
        )
    repo, path = "", None
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        path = cached_file(repo, safe_alternatives(filename or "open_clip_pytorch_model.bin"), cache_dir=cache_dir)
    if path is None and cfg.get("url"):
        local = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(urlparse(cfg["url"]).path)
        path = str(local) if local.is_file() else None
    if path is not None:
        return path
    where = " / ".join(x for x in (cfg.get("hf_hub") and f"hub repo {repo!r}", cfg.get("url")) if x)
    raise refusal(
        name,
        f"the {tag!r} weights ({where}) are",
        reason,
        "pass a checkpoint file (vpeft.backbones.clip.create(NAME, pretrained=PATH))",
        cache_dir,
    )


def hf_cached(name: str, repo: str, pretrained: bool, known: Sequence[str], **kwargs: Any) -> bool:
    """Whether a transformers ``from_pretrained`` of hub ``repo`` must run with ``local_files_only=True``: False
    online; True offline when ``config.json`` (and, if ``pretrained``, the weights) are cached. Offline with
    nothing cached: :class:`HubOfflineError` (``known``: the names buildable with random weights from a local
    config, listed for a random-weight build)."""
    if os.path.isdir(repo):  # hf:FOLDER, a save_pretrained folder: no hub involved
        return False
    reason = offline_reason()
    if reason is None:
        return False
    cache, revision = kwargs.get("cache_dir"), kwargs.get("revision")
    config = cached_file(repo, ["config.json"], revision=revision, cache_dir=cache)
    weights = cached_file(repo, _HF_WEIGHTS, revision=revision, cache_dir=cache) if pretrained else ""
    if config is not None and weights is not None:
        return True
    if pretrained:
        raise refusal(
            name,
            f"the config.json and weights of hub repo {repo!r} are",
            reason,
            "name a folder saved by save_pretrained (hf:FOLDER)",
            cache,
        )
    raise HubOfflineError(
        f"backbone {name!r}: its config.json is not in the local Hugging Face cache ({hub_cache_dir(cache)}) and "
        f"the hub is offline ({reason}); with random weights these hf: names build from a local config: "
        f"{', '.join('hf:' + k for k in known)}"
    )
