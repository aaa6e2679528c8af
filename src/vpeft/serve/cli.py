"""The ``vpeft serve`` subcommand (registered by :mod:`vpeft.cli` with :func:`add_serve_command`)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
from pathlib import Path

from ..errors import ConfigError
from .access import check_access

__all__ = ["TOKEN_VARIABLE", "add_serve_command", "serve_token"]

#: the environment variable holding the bearer token when --token is not given (kept out of `ps` listings)
TOKEN_VARIABLE = "VPEFT_SERVE_TOKEN"


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
    p.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on every endpoint but GET /health and GET / (default: the "
        f"{TOKEN_VARIABLE} environment variable, which keeps the token out of `ps` listings; the flag wins)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow cross-origin browser requests from ORIGIN (https://host[:port]; repeatable); none: CORS off",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl-C, how long in-flight requests may take to finish before they are cancelled",
    )
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
        ("--shutdown-timeout", args.shutdown_timeout, 0 < args.shutdown_timeout < float("inf"), "a number > 0"),
    ]
    for flag, value, ok, what in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {what}, got {value}")
    folder = Path(args.deltas)
    if not folder.is_dir():
        raise ConfigError(f"--deltas {args.deltas!r} is not a folder (give the folder of *.safetensors deltas)")
    if len(args.pin) > args.cache_size:
        raise ConfigError(f"--pin names {len(args.pin)} adapters but --cache-size is {args.cache_size}")
    from_flag = args.token is not None
    args.token = serve_token(args.token, os.environ)
    check_access(args.token, args.cors_origin, ("--token" if from_flag else f"${TOKEN_VARIABLE}", "--cors-origin"))


def serve_token(flag: str | None, environ) -> str | None:
    """The bearer token: ``--token`` when given, else ``$VPEFT_SERVE_TOKEN`` (unset or empty: no token)."""
    if flag is not None:
        return flag
    return environ.get(TOKEN_VARIABLE) or None


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
                     max_pixels=args.max_pixels, max_frames=args.max_frames, token=args.token,
                     cors_origins=args.cors_origin)  # fmt: skip
    refused = [i.id for i in store.adapters() if i.refused]
    note = f" ({len(refused)} refused: {', '.join(refused)}; GET /v1/adapters says why)" if refused else ""
    print(f"vpeft serve: {len(store.ids)} adapters on {store.backbone_name}{note} at http://{args.host}:{args.port}",
          flush=True)  # fmt: skip
    notes = [n for n, on in (("a bearer token is required", args.token), (f"CORS for {', '.join(args.cors_origin)}",
                                                                        args.cors_origin)) if on]  # fmt: skip
    if notes:
        print(f"vpeft serve: {'; '.join(notes)}", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=args.shutdown_timeout)  # fmt: skip
    _run_until_signalled(uvicorn.Server(config))
    print("vpeft serve: stopped", flush=True)
    return 0


def _run_until_signalled(server) -> None:
    """Run the uvicorn ``server`` until SIGTERM or Ctrl-C, which shut it down gracefully: it stops accepting
    connections, lets the requests in flight (queued and running batches) finish and answer, then its lifespan
    stops the batcher. uvicorn re-raises the signal to the previous handler once it has shut down (which would end
    the process with the signal's status): that handler is the server's own here, so the command returns 0."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        server.run()
        return
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
