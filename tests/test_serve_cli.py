"""``vpeft serve``: flags checked with one-line errors (exit 2), and the real server (uvicorn) in a subprocess."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serve_helpers as h

from vpeft.cli import main

pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vpeft[serve]')")
httpx = pytest.importorskip("httpx", reason="the test talks to the server with httpx")

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return h.make_folder(tmp_path_factory.mktemp("deltas"), {"lora_qv": h.SHARED["lora_qv"]}, segmentation=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base(folder) -> list[str]:
    return ["serve", "--backbone", "test_vit", "--no-pretrained", "--num-classes", str(h.BASE_CLASSES),
            "--img-size", str(h.SIZE), "--deltas", str(folder)]  # fmt: skip


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--port", "70000"], "--port must be an int in 0..65535, got 70000"),
        (["--max-batch-size", "0"], "--max-batch-size must be an int >= 1, got 0"),
        (["--max-wait-ms", "-1"], "--max-wait-ms must be a number >= 0, got -1.0"),
        (["--cache-size", "0"], "--cache-size must be an int >= 1, got 0"),
        (["--cache-mb", "0"], "--cache-mb must be a number > 0, got 0.0"),
        (["--max-frames", "0"], "--max-frames must be an int >= 1, got 0"),
        (["--pin", "a", "b", "--cache-size", "1"], "--pin names 2 adapters but --cache-size is 1"),
        (["--pin", "lora_q", "--port", "0"], "unknown adapter 'lora_q'. Did you mean 'lora_qv'"),
        (["--device", "tpu"], "tpu"),
        (["--shutdown-timeout", "0"], "--shutdown-timeout must be a number > 0, got 0.0"),
        (["--token", ""], "--token '' must be a non-empty string of visible ASCII characters (no spaces)"),
        (["--token", "a b"], "--token (a value of 3 characters) must be a non-empty string of visible ASCII"),
        (
            ["--cors-origin", "https://ok.example.com", "--cors-origin", "example.com"],
            "--cors-origin 'example.com' is not an origin; give scheme://host[:port] with http or https and no path",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(folder, flags, message, capsys):
    assert main([*_base(folder), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_bad_token_from_the_environment_names_the_variable(folder, monkeypatch, capsys):
    monkeypatch.setenv("VPEFT_SERVE_TOKEN", "with space")
    assert main(_base(folder)) == 2
    err = capsys.readouterr().err
    assert "$VPEFT_SERVE_TOKEN (a value of 10 characters) must be" in err and "with space" not in err, err


def test_missing_folder(tmp_path, capsys):
    argv = _base(tmp_path / "nope")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--deltas" in err and "is not a folder" in err and err.count("\n") == 1


def test_real_server_in_a_subprocess(folder, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vpeft.cli", *_base(folder), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, format="PNG")
        res = httpx.post(f"{url}/v1/predict", json={"adapter": "lora_qv", "image": base64.b64encode(buf.getvalue())
                         .decode(), "top_k": 1}, timeout=60)  # fmt: skip
        assert res.status_code == 200, res.text
        assert len(res.json()["predictions"]) == 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert "at http://127.0.0.1:" in (tmp_path / "server.log").read_text()


def test_binds_localhost_by_default():
    from vpeft.cli import _parser

    args = _parser().parse_args(["serve", "--backbone", "test_vit", "--deltas", "d"])
    assert (args.host, args.port, args.max_batch_size, args.cache_size, args.pin) == ("127.0.0.1", 8000, 32, 8, [])
