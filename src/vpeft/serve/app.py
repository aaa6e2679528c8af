"""The FastAPI application of ``vpeft serve`` (endpoints: README "Serving").

Every error is a JSON object ``{"error": one message, "status": code}``: 400 an upload that is not a (complete)
image or a malformed request, 404 an unknown adapter (the message lists the served ids, ``valid`` holds them), 409 an
adapter that is not served (refused: the reason), 413 an image past the pixel limit or an upload past the byte
limit, 422 a bad option (``top_k``), 500 anything unexpected (logged; the server keeps serving); with a token, 401
a request without ``Authorization: Bearer <token>`` (every endpoint but ``GET /health`` and the page ``GET /``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..data.video import sample_indices
from ..errors import ConfigError, DataError, UnknownNameError, VpeftError
from ..version import __version__
from .access import check_access
from .batcher import BatchRecord, DynamicBatcher
from .codec import (
    ImageError,
    ImageTooLargeError,
    VideoError,
    answer,
    decode_base64,
    decode_image,
    decode_video,
    detection_canvas,
    parse_top_k,
    transform_for,
    video_clip,
)
from .page import PAGE
from .store import AdapterInfo, AdapterRefusedError, AdapterStore

__all__ = ["BearerAuth", "ServeMetrics", "create_app"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _StoreCollector:
    """The store's cache counters, read at scrape time (per adapter, and the totals as gauges)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def collect(self):
        infos = self.store.adapters()
        for field, doc in (
            ("hits", "requests whose adapter was loaded"),
            ("misses", "requests whose adapter had to be loaded"),
            ("loads", "adapter loads"),
            ("evictions", "adapters evicted from the cache (least recently used)"),
        ):
            family = CounterMetricFamily(f"vpeft_serve_cache_{field}", doc, labels=["adapter"])
            for i in infos:
                if i.refused is None:
                    family.add_metric([i.id], getattr(i, field))
            yield family
        stats = self.store.stats()
        for name, value, doc in (
            ("vpeft_serve_adapters_loaded", stats.loaded, "adapters in the cache"),
            ("vpeft_serve_adapters_loaded_bytes", stats.loaded_bytes, "bytes the loaded adapters hold"),
            ("vpeft_serve_adapters_pinned", stats.pinned, "pinned adapters"),
            ("vpeft_serve_adapters_refused", sum(i.refused is not None for i in infos), "adapters not served"),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "vpeft_serve_shared_rebuilds", "rebuilds of the shared multi-task model", value=stats.shared_rebuilds
        )


class ServeMetrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self, store: AdapterStore, batcher: DynamicBatcher) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vpeft_serve_requests", "prediction requests by adapter and HTTP status", ["adapter", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "vpeft_serve_request_latency_seconds", "prediction latency (decoding to answer) by adapter", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "vpeft_serve_batch_size", "requests per batch", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.batch_groups = Histogram(
            "vpeft_serve_batch_forwards", "forwards per batch (the shared group is one)", buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge("vpeft_serve_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.queue_depth.set_function(lambda: batcher.queue_depth)
        self.in_flight = 0  # prediction requests received and not answered yet (read by /health)
        in_flight = Gauge("vpeft_serve_requests_in_flight", "prediction requests received and not answered yet",
                          registry=self.registry)  # fmt: skip
        in_flight.set_function(lambda: self.in_flight)
        self.registry.register(_StoreCollector(store))

    def on_batch(self, record: BatchRecord) -> None:
        self.batch_size.observe(record.size)
        self.batch_groups.observe(len(record.groups))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _status(exc: BaseException) -> int:
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, UnknownNameError):
        return 404
    if isinstance(exc, AdapterRefusedError):
        return 409
    if isinstance(exc, (ImageError, DataError)):
        return 400
    if isinstance(exc, ConfigError):
        return 422
    return 500


def _error(status: int, message: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), "status": status, **fields}, status_code=status)


def create_app(
    store: AdapterStore,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_pixels: int = 4096 * 4096,
    max_upload_bytes: int = 32 * 1024 * 1024,
    default_top_k: int = 5,
    max_frames: int = 2048,
    token: str | None = None,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The HTTP application serving ``store``'s adapters (its batcher runs while the application does).

    Args:
        store: the adapters.
        max_batch_size, max_wait_ms: the :class:`DynamicBatcher`'s.
        max_pixels: larger images are refused (413) before their pixels are decoded.
        max_upload_bytes: larger request bodies are refused (413).
        default_top_k: classes answered when a request gives no ``top_k`` (a detection answers every box).
        max_frames: a clip of more frames (a video file's, or frame images sent) is refused (413).
        token: when given, every endpoint but ``GET /health`` and the page ``GET /`` (which holds no data; its
            requests send the token typed into it) needs ``Authorization: Bearer <token>``, else 401.
        cors_origins: browser origins (``https://host[:port]``) allowed cross-origin requests; none: no CORS headers.
    """
    check_access(token, cors_origins)
    for label, value in (("max_pixels", max_pixels), ("max_upload_bytes", max_upload_bytes),
                         ("default_top_k", default_top_k), ("max_frames", max_frames)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label}={value!r} must be a positive int")
    batcher = DynamicBatcher(store, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    metrics = ServeMetrics(store, batcher)
    batcher.on_batch = metrics.on_batch
    prepare = _Preparer(store, max_pixels, max_frames)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="vpeft serve", version=__version__, lifespan=lifespan)
    app.state.store, app.state.batcher, app.state.metrics = store, batcher, metrics

    _add_error_handlers(app, store)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    if cors_origins:  # outermost: a preflight (which never carries the token) and 401s get their CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)  # fmt: skip

    async def read_request(request: Request) -> Payload:
        return await _read_request(request, max_upload_bytes, max_frames)

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        start, label = time.perf_counter(), "unknown"
        metrics.in_flight += 1
        try:
            payload = await read_request(request)
            adapter = payload.adapter
            info = store.info(adapter)
            label = adapter
            # a detection answers every box the detector kept unless top_k is given
            top_k = parse_top_k(payload.top_k, None if info.kind == "detection" else default_top_k)
            x, size, side = await run_in_threadpool(prepare, info, payload)
            output = await asyncio.wrap_future(batcher.submit(adapter, x))
            body = await run_in_threadpool(answer, info, output, top_k, size, side)
        except Exception as exc:
            status = _status(exc) if isinstance(exc, VpeftError) else 500
            metrics.requests.labels(label, str(status)).inc()
            raise
        finally:
            metrics.in_flight -= 1
        seconds = time.perf_counter() - start
        metrics.requests.labels(label, "200").inc()
        metrics.latency.labels(label).observe(seconds)
        return JSONResponse({"adapter": adapter, "kind": info.kind, **body, "latency_ms": round(seconds * 1e3, 3)})

    _add_adapter_routes(app, store, batcher, metrics)
    return app


class BearerAuth:
    """ASGI middleware: a request needs ``Authorization: Bearer <token>`` (compared in constant time), except
    ``GET /health`` and ``GET /``; else a 401 JSON error with ``WWW-Authenticate: Bearer``."""

    OPEN = frozenset({("GET", "/health"), ("GET", "/")})

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token.encode("ascii")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.OPEN:
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"authorization")
        if sent is None:
            message, challenge = "this server needs a token: send the header 'Authorization: Bearer <token>'", ""
        else:
            scheme, _, credentials = sent.strip().partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
                return await self.app(scope, receive, send)
            message = "the bearer token is wrong" if scheme.lower() == b"bearer" else (
                "the Authorization header must be 'Bearer <token>'")  # fmt: skip
            challenge = ' error="invalid_token"'
        response = _error(401, message)
        response.headers["WWW-Authenticate"] = f'Bearer realm="vpeft serve"{challenge}'
        await response(scope, receive, send)


class _Preparer:
    """Turns a request's upload into the model input of its adapter's kind (transforms cached per kind and size).

    Called as ``prepare(info, payload)`` -> ``(input tensor, the image's (width, height), a detection canvas's side)``.
    """

    def __init__(self, store: AdapterStore, max_pixels: int, max_frames: int) -> None:
        self.store, self.max_pixels, self.max_frames = store, max_pixels, max_frames
        self.transforms: dict[tuple[str, tuple[int, int]], Any] = {}

    def transform(self, info: AdapterInfo, size: tuple[int, int]) -> Any:
        key = (info.kind or "", size)
        if key not in self.transforms:
            self.transforms[key] = transform_for(self.store.backbone, info, size)
        return self.transforms[key]

    def __call__(self, info: AdapterInfo, payload: Payload) -> tuple[Any, tuple[int, int], int | None]:
        _check_input(info, payload)
        size = self.store.input_size_for(info.id)
        if info.kind == "video":
            return self.clip(info, payload, size)
        image = decode_image(payload.image or b"", self.max_pixels)
        if info.kind == "detection":
            side = max(size)
            cfg = getattr(self.store.backbone, "pretrained_cfg", None) or {}
            mean, std = cfg.get("mean") or IMAGENET_DEFAULT_MEAN, cfg.get("std") or IMAGENET_DEFAULT_STD
            return detection_canvas(image, side, mean, std), image.size, side
        return self.transform(info, size)(image), image.size, None

    def clip(self, info: AdapterInfo, payload: Payload, size: tuple[int, int]) -> tuple[Any, tuple[int, int], None]:
        """A video request's frames, sampled as the task samples evaluation clips, as one clip tensor."""
        task = info.header.task if info.header is not None else {}
        if isinstance(task.get("size"), int):
            size = (task["size"], task["size"])

        def indices(n: int) -> Any:
            return sample_indices(n, int(task.get("num_frames") or 8), stride=task.get("stride"),
                                  views=int(task.get("views") or 1))  # fmt: skip

        if payload.video is not None:
            frames = decode_video(payload.video, indices, self.max_pixels, self.max_frames)
        else:
            images = [decode_image(f, self.max_pixels) for f in payload.frames or ()]
            try:
                frames = [images[i] for i in indices(len(images))]
            except DataError as exc:
                raise VideoError(f"{len(images)} frames were sent: {exc}") from None
        return video_clip(frames, self.transform(info, size)), frames[0].size, None


def _add_error_handlers(app: FastAPI, store: AdapterStore) -> None:
    """Every error is one JSON message (404s list the valid adapter ids)."""

    @app.exception_handler(VpeftError)
    async def vpeft_error(request: Request, exc: VpeftError) -> JSONResponse:
        status = _status(exc)
        extra = {"valid": store.ids} if status == 404 else {}
        return _error(status, str(exc), **extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg")))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")


@dataclasses.dataclass
class Payload:
    """What a prediction request sends: the adapter, one of an image / a video file / frame images, ``top_k``."""

    adapter: str
    image: bytes | None = None
    video: bytes | None = None
    frames: list[bytes] | None = None
    top_k: Any = None


_INPUTS = ("image", "video", "frames")


def _check_input(info: AdapterInfo, payload: Payload) -> None:
    """One input, of the kind the adapter takes: a clip (``video`` or ``frames``) for video, else an ``image``."""
    sent = [k for k in _INPUTS if getattr(payload, k) is not None]
    if len(sent) != 1:
        raise DataError(f"send one of image, video, frames; got {', '.join(sent) if sent else 'none'}")
    if info.kind == "video" and sent[0] == "image":
        raise DataError(f"adapter {info.id!r} is a video adapter: send 'video' (a video file) or 'frames' (images "
                        "in time order) instead of 'image'")  # fmt: skip
    if info.kind != "video" and sent[0] != "image":
        raise DataError(f"adapter {info.id!r} is a {info.kind} adapter: send an 'image', not '{sent[0]}'")
    if sent[0] == "frames" and not payload.frames:
        raise DataError("frames is empty; send the clip's frames in time order")


async def _read_request(request: Request, max_upload_bytes: int, max_frames: int) -> Payload:
    """The :class:`Payload` of a multipart upload or a JSON body."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_upload_bytes:
        raise ImageTooLargeError(f"the request is {length} bytes; this server takes at most {max_upload_bytes}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return await _read_json(request, max_upload_bytes, max_frames)
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_form(request, max_upload_bytes, max_frames)
    raise DataError(
        f"content type {kind or 'none'!r} is not accepted; send multipart/form-data (image file, adapter, top_k) "
        "or application/json ({adapter, image: base64, top_k})"
    )


async def _read_json(request: Request, max_upload_bytes: int, max_frames: int) -> Payload:
    """``{adapter, image | video (base64) | frames (list of base64), top_k}``."""
    body = await request.body()
    if len(body) > max_upload_bytes:
        raise ImageTooLargeError(f"the request is {len(body)} bytes; at most {max_upload_bytes}")
    try:
        data = await request.json()
    except ValueError:
        raise DataError("the body is not valid JSON") from None
    if not isinstance(data, Mapping):
        raise DataError("the JSON body must be an object {adapter, image (base64), top_k}")
    unknown = sorted(set(data) - {"adapter", "top_k", *_INPUTS})
    if unknown:
        raise ConfigError(
            f"unknown field(s) {unknown}; the fields are adapter, image (base64), video (base64), frames (a list "
            "of base64 images), top_k"
        )
    payload = Payload(_adapter(data.get("adapter")), top_k=data.get("top_k"))
    if "image" in data or not any(k in data for k in _INPUTS):
        payload.image = decode_base64(data.get("image"))
    if "video" in data:
        payload.video = decode_base64(data["video"], "video")
    if "frames" in data:
        frames = data["frames"]
        if not isinstance(frames, list):
            raise DataError("frames must be a list of base64 images (in time order)")
        if len(frames) > max_frames:
            raise ImageTooLargeError(f"{len(frames)} frames were sent; this server takes at most {max_frames}")
        payload.frames = [decode_base64(f, f"frames[{i}]") for i, f in enumerate(frames)]
    return payload


async def _read_form(request: Request, max_upload_bytes: int, max_frames: int) -> Payload:
    """A multipart form: an ``image`` / ``video`` file or ``frames`` files, ``adapter`` and ``top_k`` fields."""
    try:
        form = await request.form(max_files=max_frames, max_fields=8)
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed multipart body
        raise DataError(f"the form could not be read ({exc})") from None
    files = {k: [v for v in form.getlist(k) if not isinstance(v, str)] for k in _INPUTS}
    if not any(files.values()):
        raise DataError("the form has no 'image' file field (a video adapter: a 'video' file or 'frames' files)")
    payload, total = Payload(_adapter(form.get("adapter")), top_k=form.get("top_k")), 0
    for key, uploads in files.items():
        if not uploads:
            continue
        if key != "frames" and len(uploads) > 1:
            raise DataError(f"the form has {len(uploads)} '{key}' files; send one")
        datas = []
        for upload in uploads:
            datas.append(await upload.read(max_upload_bytes + 1))
            total += len(datas[-1])
            if total > max_upload_bytes:
                raise ImageTooLargeError(f"the {key} file is over {max_upload_bytes} bytes")
        setattr(payload, key, datas if key == "frames" else datas[0])
    return payload


def _add_adapter_routes(app: FastAPI, store: AdapterStore, batcher: DynamicBatcher, metrics: ServeMetrics) -> None:
    """The adapter listing, load / unload, health, Prometheus metrics and the upload page."""

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        return {**store.describe(), "adapters": [i.to_dict() for i in store.adapters()]}

    @app.post("/v1/adapters/rescan")
    async def rescan() -> dict[str, Any]:
        """Read the folder again (waits for the running batch); bad new files are refused with the reason."""
        return (await run_in_threadpool(store.rescan)).to_dict()

    @app.post("/v1/adapters/{adapter}/load")
    async def load(adapter: str, pin: bool = False) -> dict[str, Any]:
        return (await run_in_threadpool(store.load, adapter, pin=pin)).to_dict()

    @app.post("/v1/adapters/{adapter}/unload")
    async def unload(adapter: str) -> dict[str, Any]:
        return (await run_in_threadpool(store.unload, adapter)).to_dict()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = store.stats()
        return {"status": "ok", "backbone": store.backbone_name, "adapters": len(store.ids), "loaded": stats.loaded,
                "queue_depth": batcher.queue_depth, "in_flight": metrics.in_flight}  # fmt: skip

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)


def _adapter(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"adapter must be a non-empty adapter id, got {value!r}; GET /v1/adapters lists them")
    return value
