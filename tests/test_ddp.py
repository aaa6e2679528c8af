"""Data-parallel training (torch DDP, gloo on CPU): two processes reproduce the single-process run exactly.

The workers are started with ``torch.multiprocessing`` and given the environment ``torchrun`` would set
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); the library initialises and destroys
the process group itself, as it does under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, TensorDataset

from vpeft.cli import main
from vpeft.data import ensure_digits_task
from vpeft.errors import ConfigError
from vpeft.train import TrainConfig, train
from vpeft.train.distributed import DistContext, ShardedBatchSampler, session, shard_loader

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the gloo backend"
)

WORLD = 2
ATOL = 1e-5
CLI_METHODS = {  # a reparameterisation, an addition method, and the linear head alone (trained by all three)
    "lora": ["--method", "lora", "--opt", "r=4", "--opt", "targets=q,v,fc1"],
    "vpt_deep": ["--method", "vpt_deep", "--opt", "num_tokens=4", "--opt", "dropout=0"],
    "linear": ["--method", "linear"],
}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _as_rank(rank: int, port: int) -> None:
    """The environment torchrun gives worker ``rank``."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": WORLD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    torch.set_num_threads(1)


def _spawn(fn, *args, timeout: float = 300.0) -> None:
    """Run ``fn(rank, *args)`` in ``WORLD`` new processes; fail (and kill them) if they hang.

    On Linux the workers are forked (they start in well under a second; spawning fresh interpreters that import
    torch and timm again costs 10-30 s on a 2-core machine). They run single-threaded, CPU only.
    """
    method = "fork" if sys.platform == "linux" else "spawn"
    procs = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=1.0):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for p in procs.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout:.0f} s")


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- the sampler and loader, no processes


@pytest.mark.parametrize("n,batch,world,drop_last", [(97, 32, 2, False), (100, 32, 4, False), (97, 32, 2, True)])
def test_sharded_batches_partition_the_single_process_batches(n, batch, world, drop_last):
    def sampler():
        return RandomSampler(range(n), generator=torch.Generator().manual_seed(3))

    expected = list(BatchSampler(sampler(), batch, drop_last))
    shards = [ShardedBatchSampler(sampler(), batch, drop_last, r, world, pad_empty=True) for r in range(world)]
    per_rank = [list(s) for s in shards]
    assert all(len(p) == len(s) == len(expected) for p, s in zip(per_rank, shards))
    for i, global_batch in enumerate(expected):
        sizes = [s.shard_sizes(i) for s in shards]
        assert all(total == len(global_batch) for _, total in sizes)
        real = [part[:local] for part, (local, _) in zip((p[i] for p in per_rank), sizes)]
        assert sum(real, []) == global_batch, "the ranks' slices, in rank order, are the single-process batch"
        assert max(map(len, real)) - min(map(len, real)) <= 1
    if not drop_last and n % batch < world:  # 97 = 3 x 32 + 1: rank 0 gets a zero-weight stand-in
        assert shards[0].shard_sizes(len(expected) - 1) == (0, 1) and len(per_rank[0][-1]) == 1
        unpadded = ShardedBatchSampler(sampler(), batch, drop_last, 0, world, pad_empty=False)
        assert len(unpadded) == len(list(unpadded)) == len(expected) - 1


def test_shard_loader_rejects_what_it_cannot_shard():
    ctx = DistContext(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    ds = TensorDataset(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"global batch .* divisible by the number of processes 2, got 5; use e.g. 4"):
        shard_loader(DataLoader(ds, batch_size=5), ctx, train=True)
    shard_loader(DataLoader(ds, batch_size=5), ctx, train=False)  # evaluation slices may differ by one sample
    with pytest.raises(ConfigError, match="already uses a DistributedSampler"):
        shard_loader(DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, 2, 0)), ctx, train=True)
    with pytest.raises(ConfigError, match="must be a torch DataLoader .* got list"):
        shard_loader([(ds.tensors[0], ds.tensors[1])], ctx, train=True)


def test_session_is_a_no_op_in_a_single_process(single_process, monkeypatch):
    with session() as ctx:
        assert ctx is None and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK is not set; launch with torchrun"):
        with session():
            pass


# --------------------------------------------------------------------------- 2 processes vs 1


def _blobs(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return TensorDataset(torch.randn(3, 8, generator=g)[y] * 2 + torch.randn(n, 8, generator=g), y)


def _train_mlp(out_dir: Path, init_seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """97 training samples in global batches of 32 (the last holds 1: one rank trains on a zero-weight stand-in),
    accumulation over 2 micro-batches, clipping, label smoothing, and 31 validation samples in batches of 10."""
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
    model[0].requires_grad_(False)  # a frozen part
    loader = DataLoader(_blobs(97, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(_blobs(31, 1), batch_size=10)
    cfg = TrainConfig(
        epochs=3, lr=2e-2, batch_size=32, grad_accum=2, warmup_epochs=0.5, label_smoothing=0.1, max_grad_norm=1.0
    )
    result = train(model, loader, cfg, val_loader=val_loader, out_dir=out_dir, progress=False)
    return model.state_dict(), result.history


def _cli_argv(data_root: Path, out: Path, method: str) -> list[str]:
    """200 images in global batches of 48 (24 per process; the last global batch holds 8), accumulating 2."""
    return [
        "train", "--backbone", "test_vit", "--no-pretrained", "--task", "digits", "--data-root", str(data_root),
        "--train-split", "val200", "--eval-split", "val200", "--img-size", "32", "--epochs", "2",
        "--batch-size", "48", "--grad-accum", "2", "--lr", "1e-2", "--warmup-epochs", "0.5",
        "--out", str(out), "--quiet", *CLI_METHODS[method],
    ]  # fmt: skip


def _worker(rank: int, ports: list[int], root: str) -> None:
    """One torchrun-like worker: the MLP through train(), then `vpeft train` per method, each its own DDP job."""
    _as_rank(rank, ports[0])
    out = Path(root) / "mlp" / f"rank{rank}"
    state, history = _train_mlp(out, init_seed=rank)  # rank 1 starts elsewhere: DDP must broadcast rank 0's init
    assert not dist.is_initialized(), "train() destroys the process group it created"
    assert out.is_dir() == (rank == 0), "only rank 0 writes metrics.json"
    torch.save({"state": state, "history": history}, Path(root) / "mlp" / f"result{rank}.pt")  # the test's record
    for method, port in zip(CLI_METHODS, ports[1:]):
        os.environ["MASTER_PORT"] = str(port)  # a fresh process group per run, as with one torchrun per run
        torch.manual_seed(rank)  # the method's random init differs on rank 1: DDP must broadcast rank 0's
        out = Path(root) / (f"{method}-ddp" if rank == 0 else f"{method}-rank{rank}")
        assert main(_cli_argv(Path(root) / "data", out, method)) == 0
        assert not dist.is_initialized()
        assert rank == 0 or not out.exists(), f"rank {rank} wrote into its --out folder"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Run every 2-process job of this module in one pair of worker processes (spawning them costs most)."""
    root = tmp_path_factory.mktemp("ddp")
    ensure_digits_task(root / "data")
    _spawn(_worker, _free_ports(1 + len(CLI_METHODS)), str(root))
    return root


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_same_history(ref: list[dict], got: list[dict]) -> None:
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert g["steps"] == r["steps"] and g["lr"] == r["lr"]
        for key in ("train_loss", "train_top1", "val_loss", "val_top1"):
            assert g[key] == pytest.approx(r[key], abs=ATOL), key


def test_two_processes_train_like_one(ddp_runs, tmp_path, single_process):
    ref_state, ref_history = _train_mlp(tmp_path / "single")
    for rank in range(WORLD):
        got = torch.load(ddp_runs / "mlp" / f"result{rank}.pt")
        diff = _max_diff(ref_state, got["state"])
        print(f"MLP, rank {rank}: max |single - DDP| over the state dict = {diff:.2e}")
        assert diff <= ATOL
        _assert_same_history(ref_history, got["history"])
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3)).state_dict()
    assert _max_diff(init, ref_state) > 0.05, "training moved the parameters far beyond the tolerance"
    assert sorted(p.name for p in (ddp_runs / "mlp" / "rank0").iterdir()) == ["checkpoint.pt", "metrics.json"]
    metrics = json.loads((ddp_runs / "mlp" / "rank0" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["steps"] == ref_history[-1]["steps"] == 3 * 2


def test_vpeft_train_on_two_processes_equals_one(ddp_runs, tmp_path, single_process):
    for method in CLI_METHODS:
        single, ddp = tmp_path / f"{method}-single", ddp_runs / f"{method}-ddp"
        with torch.random.fork_rng():
            torch.manual_seed(0)
            assert main(_cli_argv(ddp_runs / "data", single, method)) == 0
        assert sorted(p.name for p in ddp.iterdir()) == ["delta.safetensors", "metrics.json", "result.json"]
        delta_single, delta_ddp = load_file(single / "delta.safetensors"), load_file(ddp / "delta.safetensors")
        diff = _max_diff(delta_single, delta_ddp)
        print(f"vpeft train {method}: max |single - DDP| over {len(delta_ddp)} delta tensors = {diff:.2e}")
        assert diff <= ATOL
        assert {k for k in delta_ddp if k.startswith("head.")} == {"head.weight", "head.bias"}
        ref, got = (json.loads((d / "metrics.json").read_text())["history"] for d in (single, ddp))
        _assert_same_history(ref, got)
        ref, got = (json.loads((d / "result.json").read_text()) for d in (single, ddp))
        assert got["eval_n"] == ref["eval_n"] == 200 and got["top1"] == pytest.approx(ref["top1"], abs=ATOL)
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=ATOL)
        assert got["config"] == ref["config"] and got["train"] == ref["train"]
