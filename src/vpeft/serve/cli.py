"""The ``vpeft serve`` subcommand (registered by :mod:`vpeft.cli` with :func:`add_serve_command`)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from ..errors import ConfigError

__all__ = ["add_serve_command"]


def add_serve_command(sub) -> None:
    """Add ``vpeft serve`` to the subcommands ``sub`` (an ``argparse`` subparsers object)."""
    p = sub.add_parser(
        "serve",
        help="serve the deltas of a folder for one frozen backbone over HTTP, batched across adapters",
        description="Serves every *.safetensors delta of --deltas trained from --backbone (an adapter named by its "
        "file stem) on 127.0.0.1 unless --host says otherwise. Endpoints: POST /v1/predict, GET /v1/adapters, "
        "POST /v1/adapters/ID/load and /unload, POST /v1/adapters/rescan, GET /health, GET /metrics, GET / (a page "
        "to try it). Needs the serve extra: pip install 'vpeft[serve]'.",
    )
    p.add_argument("--backbone", required=True, help="the frozen backbone the deltas were trained from")
    p.add_argument("--deltas", required=True, metavar="DIR", help="folder of *.safetensors deltas")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests per batch at most")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request may wait for a batch to fill")
    p.add_argument("--cache-size", type=int, default=8, help="adapters loaded at once at most (LRU)")
    p.add_argument("--cache-mb", type=float, default=None, help="megabytes of loaded adapters at most (LRU)")
    p.add_argument("--pin", nargs="+", action="extend", default=[], metavar="ID", help="adapters kept loaded")
    p.add_argument("--img-size", type=int, default=None, help="the backbone's input size (as the deltas were trained)")
    p.add_argument("--no-pretrained", action="store_true", help="seeded random backbone (smoke tests)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=0,
        help="classes the backbone is created with; only changes a --no-pretrained backbone's random weights "
        "(give the value the deltas were trained with)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="larger images are refused (HTTP 413)")
    p.add_argument("--max-frames", type=int, default=2048, help="longer clips (video adapters) are refused (HTTP 413)")
    p.add_argument("--trust-unsigned", action="store_true", help="serve deltas without a content digest")
    p.set_defaults(fn=_cmd_serve)


def _check(args: argparse.Namespace) -> None:
    checks = [
        ("--port", args.port, 0 <= args.port <= 65535, "an int in 0..65535"),
        ("--max-batch-size", args.max_batch_size, args.max_batch_size >= 1, "an int >= 1"),
        ("--max-wait-ms", args.max_wait_ms, args.max_wait_ms >= 0, "a number >= 0"),
        ("--cache-size", args.cache_size, args.cache_size >= 1, "an int >= 1"),
        ("--cache-mb", args.cache_mb, args.cache_mb is None or args.cache_mb > 0, "a number > 0"),
        ("--img-size", args.img_size, args.img_size is None or args.img_size >= 1, "an int >= 1"),
        ("--num-classes", args.num_classes, args.num_classes >= 0, "an int >= 0"),
        ("--max-pixels", args.max_pixels, args.max_pixels >= 1, "an int >= 1"),
        ("--max-frames", args.max_frames, args.max_frames >= 1, "an int >= 1"),
    ]
    for flag, value, ok, what in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {what}, got {value}")
    folder = Path(args.deltas)
    if not folder.is_dir():
        raise ConfigError(f"--deltas {args.deltas!r} is not a folder (give the folder of *.safetensors deltas)")
    if len(args.pin) > args.cache_size:
        raise ConfigError(f"--pin names {len(args.pin)} adapters but --cache-size is {args.cache_size}")


def _check_port(host: str, port: int) -> None:
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} cannot be resolved ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    _check(args)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise ConfigError(f"vpeft serve needs the serve extra ({exc}): pip install 'vpeft[serve]'") from None
    from ..devices import check_device
    from ..run import build_backbone
    from .store import AdapterStore

    check_device(args.device)
    _check_port(args.host, args.port)
    backbone = build_backbone(args.backbone, args.num_classes, args.img_size, pretrained=not args.no_pretrained)
    store = AdapterStore(
        backbone,
        args.deltas,
        capacity=args.cache_size,
        capacity_bytes=None if args.cache_mb is None else max(1, int(args.cache_mb * 2**20)),
        device=args.device,
        trust_unsigned=args.trust_unsigned,
    )
    for name in args.pin:
        store.load(name, pin=True)
    app = create_app(store, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     max_pixels=args.max_pixels, max_frames=args.max_frames)  # fmt: skip
    refused = [i.id for i in store.adapters() if i.refused]
    note = f" ({len(refused)} refused: {', '.join(refused)}; GET /v1/adapters says why)" if refused else ""
    print(f"vpeft serve: {len(store.ids)} adapters on {store.backbone_name}{note} at http://{args.host}:{args.port}",
          flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0
