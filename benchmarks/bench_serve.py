"""``vpeft serve`` under load: mixed-adapter batches on one frozen backbone vs serving one adapter at a time.

K classification deltas (random non-zero values: timing does not depend on them; LoRA q,v, LoRA fc1,fc2, SSF, a
linear probe, cycled: every one mergeable) of one random-init timm model are saved to a folder, and one server per
configuration is started on a free loopback port (uvicorn in a thread of this process, the FastAPI app of ``vpeft
serve``). All serve the same folder on the same backbone weights:

* ``mixed batches``: the dynamic batcher (``--max-batch-size``, ``--max-wait-ms``) with every adapter in the shared
  ``MultiTaskModel``: a batch mixing adapters is one backbone forward;
* ``per-adapter batches``: the same batcher, every adapter on its own model (``share=False``): a batch is split
  into one forward per adapter (how a server without heterogeneous batching runs);
* ``no batching``: shared adapters, ``max_batch_size=1``: one forward per request;
* ``swap per adapter``: one merged model per adapter, swapped in on demand. Each delta is merged as ``vpeft merge``
  does (``vpeft.load`` onto a fresh backbone, ``vpeft.merge``, ``vpeft.save_merged``: a plain timm state dict per
  adapter, in files on disk as a deployment of merged models keeps them); one resident plain timm model (no vpeft
  module in it) answers every request, batches of one, and when a request's adapter differs from the one resident,
  its merged file is read and ``load_state_dict``-ed into the resident model (its head resized when the class count
  differs). The cost measured is that swap.

``--clients`` concurrent HTTP clients (``httpx.AsyncClient`` in this process) send ``--requests`` requests per round
(a PNG of the input size as base64 JSON, ``top_k=1``), the adapter of each drawn from a Zipf-like popularity
(``p(k) ~ 1 / (k + 1) ** --zipf``, seeded: the same sequence for every configuration). Rounds are interleaved: each
round runs every configuration once, in an order rotated by one per round; ratios are medians of per-round ratios,
so every ratio compares configurations measured side by side in this one run. Wall time (the server's threads, the
clients and the batcher share the process). Every answer is checked: the top-1 classes of all configurations are
equal, and their scores within 1e-4 of the mixed batches' (merging and batching change the float rounding).

Usage::

    python benchmarks/bench_serve.py            # ViT-S/16, 224 px, 4 adapters, 16 clients, 256 requests x 3 rounds
    python benchmarks/bench_serve.py --quick    # tiny ViT, 3 adapters, 4 clients, 24 requests: a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as C
import numpy as np
import torch
from PIL import Image

import vpeft

METHODS = [
    ("lora", {"r": 8, "targets": ["q", "v"]}),
    ("lora", {"r": 4, "targets": ["fc1", "fc2"]}),
    ("ssf", {}),
    ("linear", {}),
]
CLASSES = (10, 37, 100, 5)
MIXED, PER_ADAPTER, NO_BATCHING, SWAP = "mixed batches", "per-adapter batches", "no batching", "swap per adapter"
SCORE_TOL = 1e-4  # top-1 scores of every configuration vs mixed batches' (merging and batching change the rounding)


def configurations(args) -> dict[str, dict[str, Any]]:
    """label -> AdapterStore options (share, capacity) and create_app options (max_batch_size, max_wait_ms)."""
    batch = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}
    return {
        MIXED: {"store": {"share": True, "capacity": None}, "app": batch},
        PER_ADAPTER: {"store": {"share": False, "capacity": None}, "app": batch},
        NO_BATCHING: {"store": {"share": True, "capacity": None}, "app": {"max_batch_size": 1, "max_wait_ms": 0}},
        SWAP: {"store": {"share": False, "capacity": 1}, "app": {"max_batch_size": 1, "max_wait_ms": 0}, "swap": True},
    }


def backbone(args) -> torch.nn.Module:
    """The frozen backbone (seeded: the same weights every call; a random model's init depends on its head)."""
    return C.create_model(args.model, args.size, num_classes=CLASSES[0], quick=args.quick).eval()


def make_deltas(args, folder: Path) -> list[str]:
    names = []
    for i in range(args.adapters):
        method, options = METHODS[i % len(METHODS)]
        model = backbone(args)
        model.reset_classifier(CLASSES[i % len(CLASSES)])
        vpeft.apply(model, method, **options)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        names.append(f"a{i}-{method}")
        vpeft.save(model, folder / f"{names[-1]}.safetensors")
    return names


def make_merged(args, folder: Path, names: list[str]) -> dict[str, Path]:
    """One merged model per delta, as ``vpeft merge`` writes it: the delta loaded onto a fresh backbone, merged,
    its full state dict saved (``folder/merged/<id>.safetensors``, outside the served folder's ``*.safetensors``)."""
    out = folder / "merged"
    out.mkdir()
    paths = {}
    for i, name in enumerate(names):
        model = backbone(args)
        model.reset_classifier(CLASSES[i % len(CLASSES)])
        vpeft.load(model, folder / f"{name}.safetensors")
        vpeft.merge(model, keep_original=False)  # raises for a method that is not mergeable
        paths[name] = vpeft.save_merged(model, out / f"{name}.safetensors")
    return paths


def vpeft_modules(model: torch.nn.Module) -> int:
    """Modules of vpeft's own classes in ``model`` (LoRA wrappers, adapters ...): 0 in a merged plain model."""
    return sum(type(m).__module__.split(".")[0] == "vpeft" for m in model.modules())


def swap_store(args, folder: Path, merged: dict[str, Path], options: dict[str, Any]):
    """The ``swap per adapter`` store: adapters listed from the delta folder, every request answered by one
    resident plain model into which the request's merged state dict is loaded when its adapter is not resident."""
    from safetensors.torch import load_file

    from vpeft.errors import ConfigError
    from vpeft.serve import AdapterStore

    class SwapStore(AdapterStore):
        def __init__(self) -> None:
            super().__init__(backbone(args), folder, **options)
            self.resident = backbone(args).requires_grad_(False)
            self.current: str | None = None
            self.swaps = self.served = 0

        def run(self, names, x):
            with self.exclusive():
                if len(set(names)) != 1:
                    raise ConfigError(f"one adapter per forward on the resident model, got {sorted(set(names))}")
                if names[0] != self.current:
                    self.swap_in(names[0])
                with torch.inference_mode():
                    out = self.resident(x.to(self.device))
                self.served += len(names)
                return [o.detach().cpu() for o in out]

        def swap_in(self, name: str) -> None:
            state = load_file(merged[name], device=str(self.device))
            classes = state[f"{self.head_name}.weight"].shape[0]
            with torch.no_grad():
                if self.resident.num_classes != classes:
                    self.resident.reset_classifier(classes)
                    self.resident.requires_grad_(False)
                self.resident.load_state_dict(state, strict=True)
            self.current, self.swaps = name, self.swaps + 1

    return SwapStore()


def request_stream(args, names: list[str]) -> list[str]:
    weights = 1.0 / np.arange(1, len(names) + 1) ** args.zipf
    rng = np.random.default_rng(args.seed)
    return [names[i] for i in rng.choice(len(names), size=args.requests, p=weights / weights.sum())]


class Server:
    """One configuration's app on a free loopback port, in a thread; counts the batches it ran."""

    def __init__(self, args, folder: Path, options: dict[str, Any], merged: dict[str, Path]) -> None:
        import uvicorn

        from vpeft.serve import AdapterStore, create_app

        if options.get("swap"):
            store = swap_store(args, folder, merged, options["store"])
        else:
            store = AdapterStore(backbone(args), folder, **options["store"])
        self.store = store
        self.app = create_app(store, **options["app"])
        self.records: list[Any] = []
        batcher = self.app.state.batcher
        metrics_hook = batcher.on_batch
        batcher.on_batch = lambda r: (self.records.append(r), metrics_hook(r))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1/predict"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drive(url: str, stream: list[str], image: str, clients: int, timeout: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = [0.0] * len(stream)
    answers: list[int] = [-1] * len(stream)
    scores: list[float] = [float("nan")] * len(stream)
    cursor = iter(range(len(stream)))

    async def client(http: httpx.AsyncClient) -> None:
        for i in cursor:
            start = time.perf_counter()
            res = await http.post(url, json={"adapter": stream[i], "image": image, "top_k": 1})
            latencies[i] = time.perf_counter() - start
            if res.status_code != 200:
                raise RuntimeError(f"{stream[i]}: HTTP {res.status_code}: {res.text[:300]}")
            top = res.json()["predictions"][0]
            answers[i], scores[i] = top["index"], top["score"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "latencies": latencies, "answers": answers, "scores": scores}


def swap_report(store, merged: dict[str, Path], requests: int) -> dict[str, Any]:
    """What the swap configuration served with: the merged files' format, swaps, requests the resident model
    answered (of ``requests`` sent), vpeft modules left in it."""
    from safetensors import safe_open

    formats = {}
    for name, path in merged.items():
        with safe_open(str(path), "pt") as f:
            formats[name] = (f.metadata() or {}).get("format")
    return {
        "merged": formats,
        "swaps": store.swaps,
        "served": store.served,
        "requests": requests,
        "resident_vpeft_modules": vpeft_modules(store.resident),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--adapters", type=int, default=4, help="K deltas (methods cycled: lora q,v / lora fc / ssf / linear)"
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    p.add_argument("--requests", type=int, default=256, help="requests per configuration and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--zipf", type=float, default=1.1, help="popularity exponent: p(k) ~ 1 / (k + 1) ** zipf")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take before the run fails")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="tiny ViT, 3 adapters, 4 clients, 24 requests, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.clients, args.requests, args.rounds = min(args.adapters, 3), 4, 24, 1
        args.size = C.QUICK_VIT["img_size"]
    for flag in ("adapters", "clients", "requests", "rounds", "max_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    threads = C.set_threads(args.threads)
    device = torch.device("cpu")

    buf = io.BytesIO()
    pixels = np.random.default_rng(args.seed).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()

    configs = configurations(args)
    with tempfile.TemporaryDirectory() as tmp:
        names = make_deltas(args, Path(tmp))
        merged = make_merged(args, Path(tmp), names)
        stream = request_stream(args, names)
        servers = {label: Server(args, Path(tmp), options, merged) for label, options in configs.items()}
        try:
            labels = list(servers)
            print(f"warm-up: {len(labels)} servers, {len(names)} adapters", file=sys.stderr, flush=True)
            for label in labels:  # loads every adapter (and builds the shared model) before timing
                asyncio.run(_drive(servers[label].url, names, image, 1, args.timeout))
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
            for r in range(args.rounds):
                order = labels[r % len(labels) :] + labels[: r % len(labels)]
                for label in order:
                    servers[label].records.clear()
                    run = asyncio.run(_drive(servers[label].url, stream, image, args.clients, args.timeout))
                    run["batches"] = list(servers[label].records)
                    runs[label].append(run)
                print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            swap = swap_report(servers[SWAP].store, merged, len(names) + args.requests * args.rounds)
        finally:
            for server in servers.values():
                server.close()

    same_top1 = all(run["answers"] == runs[MIXED][0]["answers"] for label in runs for run in runs[label])
    score_diff = max(
        abs(a - b) for label in runs for run in runs[label] for a, b in zip(run["scores"], runs[MIXED][0]["scores"])
    )
    agree = same_top1 and score_diff <= SCORE_TOL
    rows = []
    for label, label_runs in runs.items():
        lat = np.array([t for run in label_runs for t in run["latencies"]]) * 1e3
        batches = [b for run in label_runs for b in run["batches"]]
        rows.append(
            {
                "configuration": label,
                "req_s": C.median([args.requests / run["seconds"] for run in label_runs]),
                "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)),
                "x_mixed": C.median(
                    [m["seconds"] / run["seconds"] for run, m in zip(label_runs, runs[MIXED])]
                ),  # this configuration's throughput / mixed batches', per round
                "batch": float(np.mean([b.size for b in batches])) if batches else None,
                "forwards": float(np.mean([len(b.groups) for b in batches])) if batches else None,
            }
        )
    desc = f"{C.QUICK_MODEL} (tiny, --quick)" if args.quick else args.model
    print(
        C.header(
            f"vpeft serve over loopback HTTP: {desc}, {args.size} px, {len(names)} adapters (Zipf {args.zipf}), "
            f"{args.clients} clients, {args.requests} requests x {args.rounds} rounds, "
            f"max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms",
            device,
            threads,
            ", clients and servers in one process",
            "wall",
        )
    )
    print()
    print(
        C.table(
            rows,
            [
                ("configuration", "configuration", "s"),
                ("req_s", "requests/s", ".1f"),
                ("p50_ms", "p50 ms", ".1f"),
                ("p99_ms", "p99 ms", ".1f"),
                ("x_mixed", "throughput x mixed", ".3f"),
                ("batch", "requests/batch", ".2f"),
                ("forwards", "forwards/batch", ".2f"),
            ],
        )
    )
    counts = {n: stream.count(n) for n in names}
    print(f"\nrequests per adapter (one round): {', '.join(f'{n}: {c}' for n, c in counts.items())}")
    formats = ", ".join(sorted(set(swap["merged"].values())))
    print(
        f"swap per adapter: {len(swap['merged'])} merged models on disk ({formats} files of "
        f"{', '.join(swap['merged'])}), "
        f"{swap['swaps']} load_state_dict swaps into the resident model, "
        f"which answered {swap['served']} of {swap['requests']} requests and holds {swap['resident_vpeft_modules']} "
        "vpeft modules (0: merged weights, no wrappers)"
    )
    print(
        f"answers agree across configurations: {agree} (top-1 classes equal: {same_top1}; top-1 scores within "
        f"{SCORE_TOL:g} of mixed batches': max difference {score_diff:.2e})"
    )
    summary = ", ".join(f"{r['configuration']} {r['x_mixed']:.3f}x" for r in rows if r["configuration"] != MIXED)
    print(f"throughput relative to mixed batches: {summary}")
    C.write_json(args.json, {"args": vars(args), "threads": threads, "clock": "wall", "rows": rows, "agree": agree,
                             "score_diff": score_diff, "swap": swap})  # fmt: skip
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
