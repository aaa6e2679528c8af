"""The README's nginx configuration for several ``vpeft serve`` processes, run for real where nginx is installed
(skipped otherwise): two servers on loopback ports behind the README's ``upstream`` block (``hash $arg_adapter
consistent``); every adapter's requests, and a load request with ``?adapter=``, reach one process only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serve_helpers as h

pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vpeft[serve]')")
httpx = pytest.importorskip("httpx", reason="the test talks to the server with httpx")

REPO = Path(__file__).resolve().parents[1]
# both processes get some (they do not with p ~ 2^-10); an odd count: round robin would split every adapter
ADAPTERS = [f"task{i:02d}" for i in range(11)]


def _readme_nginx() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Serving (`vpeft serve`)") :]
    [block] = re.findall(r"^```nginx\n(.*?)^```$", section[: section.index("\n## ")], flags=re.S | re.M)
    return block


def _local(block: str, backends: list[int], port: int, root: Path) -> str:
    """The README's block on loopback: its backends' addresses replaced by ``backends``, plain HTTP on ``port``
    (no certificate here), inside the few top-level lines a stand-alone nginx needs."""
    servers = re.findall(r"^ *server \d+\.\d+\.\d+\.\d+:\d+;.*$", block, flags=re.M)
    assert len(servers) >= 2, block
    block = block.replace(servers[0], "\n".join(f"    server 127.0.0.1:{p};" for p in backends))
    for line in servers[1:]:
        block = block.replace(line + "\n", "")
    block = re.sub(r"listen 443 ssl;.*", f"listen 127.0.0.1:{port};", block)
    return (f"pid {root}/nginx.pid;\nerror_log {root}/error.log;\ndaemon off;\nevents {{}}\nhttp {{\naccess_log off;\n"
            f"client_body_temp_path {root}/body;\nproxy_temp_path {root}/proxy;\n{block}}}\n")  # fmt: skip


def _wait(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up: {log.read_text()}"
        time.sleep(0.2)


def test_the_readme_nginx_upstream_routes_each_adapter_to_one_process(tmp_path):
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    folder = h.make_folder(tmp_path / "deltas", dict.fromkeys(ADAPTERS, h.SHARED["lora_qv"]), segmentation=False)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "VPEFT_SERVE_TOKEN": "tok"}  # fmt: skip
    ports, lb, procs = [h.free_port(), h.free_port()], h.free_port(), []
    try:
        for i, port in enumerate(ports):
            log = tmp_path / f"server{i}.log"
            with log.open("w") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "vpeft.cli", "serve", "--backbone", "test_vit", "--no-pretrained",
                     "--num-classes", str(h.BASE_CLASSES), "--img-size", str(h.SIZE), "--deltas", str(folder),
                     "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env))  # fmt: skip
        conf = tmp_path / "nginx.conf"
        conf.write_text(_local(_readme_nginx(), ports, lb, tmp_path))
        procs.append(subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.STDOUT,
                                      stdout=(tmp_path / "nginx.log").open("w")))  # fmt: skip
        for i, port in enumerate(ports):
            _wait(f"http://127.0.0.1:{port}", procs[i], tmp_path / f"server{i}.log")
        auth, image = {"Authorization": "Bearer tok"}, h.png_bytes()
        _wait(f"http://127.0.0.1:{lb}", procs[-1], tmp_path / "error.log")
        for _ in range(2):
            for adapter in ADAPTERS:
                res = httpx.post(f"http://127.0.0.1:{lb}/v1/predict", params={"adapter": adapter}, headers=auth,
                                 files={"image": ("x.png", image)}, data={"adapter": adapter}, timeout=60)  # fmt: skip
                assert res.status_code == 200, res.text
        res = httpx.post(f"http://127.0.0.1:{lb}/v1/adapters/task03/load?pin=true&adapter=task03", headers=auth,
                         timeout=60)  # fmt: skip
        assert res.status_code == 200 and res.json()["pinned"], res.text
        served, pinned = {}, {}
        for port in ports:
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=auth, timeout=10).text
            for adapter, n in re.findall(r'vpeft_serve_requests_total\{adapter="(\w+)",status="200"\} (\S+)', metrics):
                served.setdefault(adapter, []).append((port, float(n)))
            listing = httpx.get(f"http://127.0.0.1:{port}/v1/adapters", headers=auth, timeout=10).json()
            pinned[port] = [a["id"] for a in listing["adapters"] if a["pinned"]]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert sorted(served) == ADAPTERS and all(len(v) == 1 and v[0][1] == 2.0 for v in served.values()), served
    assert len({v[0][0] for v in served.values()}) == 2, f"the hash spreads the adapters over both: {served}"
    assert pinned[served["task03"][0][0]] == ["task03"] and sum(map(len, pinned.values())) == 1, pinned
