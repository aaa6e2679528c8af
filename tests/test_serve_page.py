"""The page of GET / in headless Chromium, against a real server in a thread: the adapters are listed, an image
picked in the form gets its classes (classification) and its coloured mask (segmentation)."""

from __future__ import annotations

import html
import json
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
import serve_helpers as h

uvicorn = pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vpeft[serve]')")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vpeft[serve]')")

from vpeft.serve import AdapterStore, create_app  # noqa: E402
from vpeft.serve.page import PAGE  # noqa: E402

PROBE = """<script>
const wait = (ok, ms = 15000) => new Promise((resolve, reject) => {
  const t0 = Date.now();
  const tick = () => ok() ? resolve() : Date.now() - t0 > ms ? reject('timeout') : setTimeout(tick, 50);
  tick();
});
async function pick(adapter) {
  const c = document.createElement('canvas'); c.width = 24; c.height = 16;
  const ctx = c.getContext('2d'); ctx.fillStyle = '#c83232'; ctx.fillRect(0, 0, 24, 16);
  const blob = await new Promise(r => c.toBlob(r, 'image/png'));
  const dt = new DataTransfer(); dt.items.add(new File([blob], 'x.png', {type: 'image/png'}));
  document.getElementById('image').files = dt.files;
  document.getElementById('adapter').value = adapter;
  delete document.getElementById('answer').dataset.done;
  document.getElementById('form').requestSubmit();
  await wait(() => document.getElementById('answer').dataset.done || document.getElementById('error').textContent);
}
window.addEventListener('load', async () => {
  const res = {};
  try {
    await wait(() => document.querySelectorAll('#adapter option').length > 0);
    res.options = Array.from(document.querySelectorAll('#adapter option')).map(o => [o.value, o.disabled]);
    await pick('lora_qv');
    res.classRows = document.querySelectorAll('#answer tr').length;
    res.error1 = document.getElementById('error').textContent;
    await pick('seg');
    await wait(() => document.getElementById('mask').dataset.ready);
    const m = document.getElementById('mask');
    res.mask = [m.width, m.height, m.hidden];
    res.segText = document.getElementById('answer').textContent;
  } catch (e) { res.failed = String(e); }
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script></body>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_page_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    folder = h.make_folder(tmp_path / "deltas", {"lora_qv": h.SHARED["lora_qv"]})
    (folder / "broken.safetensors").write_bytes(b"x")
    app = create_app(AdapterStore(h.backbone(), folder), max_wait_ms=1)

    @app.get("/probe")
    async def probe():
        from fastapi.responses import HTMLResponse

        return HTMLResponse(PAGE.replace("</body>", PROBE))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom",
            f"http://127.0.0.1:{port}/probe",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        server.should_exit = True
        thread.join(20)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no probe output; chromium rc {proc.returncode}: {proc.stderr[-2000:]}"
    res = json.loads(html.unescape(found.group(1)))
    assert "failed" not in res, res
    assert res["options"] == [["broken", True], ["lora_qv", False], ["seg", False]], "refused adapters are disabled"
    assert res["error1"] == "" and res["classRows"] == 4, "a header row and the 3 classes of lora_qv"
    assert res["mask"] == [24, 16, False], "the coloured mask at the image's size"
    text = res["segText"]
    assert "seg (segmentation)" in text and re.search(r"(sky|road|car)\d+\.\d%", text), text
