"""Graceful shutdown of a real ``vpeft serve`` subprocess: SIGTERM (or Ctrl-C) while requests are queued in a batch
that has not run yet; the server stops accepting connections, the requests still get their (correct) answers, and the
process exits 0. The server takes its token from ``--token`` over ``$VPEFT_SERVE_TOKEN`` (the flag wins)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serve_helpers as h
import torch

pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vpeft[serve]')")
httpx = pytest.importorskip("httpx", reason="the test talks to the server with httpx")

from PIL import Image  # noqa: E402

from vpeft.serve import AdapterStore  # noqa: E402
from vpeft.serve.codec import transform_for  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
WAIT_MS = 6000  # the batch of the first queued request waits this long for others: the requests are in flight
IN_FLIGHT = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return h.make_folder(tmp_path_factory.mktemp("deltas"), {"lora_qv": h.SHARED["lora_qv"]}, segmentation=False)


def _expected_top(folder, data: bytes, k: int) -> list[int]:
    store = AdapterStore(h.backbone(), folder)
    x = transform_for(store.backbone, store.info("lora_qv"), store.input_size_for("lora_qv"))(
        Image.open(io.BytesIO(data)).convert("RGB")
    )
    with torch.inference_mode():
        return h.reference(folder, "lora_qv")(x[None])[0].topk(k).indices.tolist()


def _start(folder, tmp_path, port: int) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "VPEFT_SERVE_TOKEN": "from-the-environment"}  # fmt: skip
    argv = ["serve", "--backbone", "test_vit", "--no-pretrained", "--num-classes", str(h.BASE_CLASSES), "--img-size",
            str(h.SIZE), "--deltas", str(folder), "--port", str(port), "--max-wait-ms", str(WAIT_MS),
            "--token", "from-the-flag"]  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vpeft.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env)  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, log
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not come up: {log.read_text()}"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_shutdown_finishes_the_requests_in_flight_and_exits_0(folder, tmp_path, sig):
    port = h.free_port()
    url = f"http://127.0.0.1:{port}"
    proc, log = _start(folder, tmp_path, port)
    data = h.png_bytes(36, 28, seed=5)
    body = {"adapter": "lora_qv", "image": base64.b64encode(data).decode(), "top_k": 3}
    try:
        wrong = httpx.get(f"{url}/v1/adapters", headers={"Authorization": "Bearer from-the-environment"}, timeout=10)
        assert wrong.status_code == 401, "--token wins over $VPEFT_SERVE_TOKEN"
        headers = {"Authorization": "Bearer from-the-flag"}
        with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/predict", json=body, headers=headers, timeout=120)
                       for _ in range(IN_FLIGHT)]  # fmt: skip
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/health", timeout=5).json()["in_flight"] < IN_FLIGHT:
                done = [f.result().text for f in futures if f.done()]
                assert time.monotonic() < deadline and not done, f"requests not queued: {done}"
                time.sleep(0.05)
            queued = time.monotonic()
            proc.send_signal(sig)
            while True:  # new connections are refused while the queued batch still waits to run
                try:
                    httpx.get(f"{url}/health", timeout=1)
                except httpx.ConnectError:
                    break
                except httpx.TransportError:
                    pass
                assert time.monotonic() - queued < WAIT_MS / 1000 - 1, "still accepting connections after the signal"
                time.sleep(0.05)
            assert not any(f.done() for f in futures), "the batch was still waiting when connections were refused"
            answers = [f.result() for f in futures]
        expected = _expected_top(folder, data, 3)
        for res in answers:
            assert res.status_code == 200, res.text
            assert [p["index"] for p in res.json()["predictions"]] == expected
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/v1/predict", json=body, headers=headers, timeout=5)
    text = log.read_text()
    assert "Traceback" not in text and "vpeft serve: stopped" in text, text
    assert "vpeft serve: a bearer token is required" in text and "from-the-flag" not in text, "never the token"
