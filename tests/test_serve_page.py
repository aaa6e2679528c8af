"""The page of GET / in headless Chromium, against a real server in a thread: the adapters are listed, an image
picked in the form gets its classes (classification), its coloured mask (segmentation), its boxes drawn over it
with class and score (detection); a video adapter takes a video file and shows the clip's classes."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
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


def _probe_in_chromium(app, probe: str, tmp_path) -> dict:
    """Serve ``app`` (with ``/probe``: the page with ``probe`` appended) on a free loopback port, load ``/probe`` in
    headless Chromium and return the JSON the probe wrote into ``<pre id="probe">``."""
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")

    from fastapi.responses import HTMLResponse

    async def with_probe(scope, receive, send):  # /probe outside the app: a token the app needs does not guard it
        if scope["type"] == "http" and scope["path"] == "/probe":
            return await HTMLResponse(PAGE.replace("</body>", probe))(scope, receive, send)
        return await app(scope, receive, send)

    with h.serving(with_probe) as url:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom", f"{url}/probe",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no probe output; chromium rc {proc.returncode}: {proc.stderr[-2000:]}"
    res = json.loads(html.unescape(found.group(1)))
    assert "failed" not in res, res
    return res


def test_page_in_headless_chromium(tmp_path):
    if _chromium() is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    folder = h.make_folder(tmp_path / "deltas", {"lora_qv": h.SHARED["lora_qv"]})
    (folder / "broken.safetensors").write_bytes(b"x")
    app = create_app(AdapterStore(h.backbone(), folder), max_wait_ms=1)
    res = _probe_in_chromium(app, PROBE, tmp_path)
    assert res["options"] == [["broken", True], ["lora_qv", False], ["seg", False]], "refused adapters are disabled"
    assert res["error1"] == "" and res["classRows"] == 4, "a header row and the 3 classes of lora_qv"
    assert res["mask"] == [24, 16, False], "the coloured mask at the image's size"
    text = res["segText"]
    assert "seg (segmentation)" in text and re.search(r"(sky|road|car)\d+\.\d%", text), text


TOKEN_PROBE = """<script>
const wait = (ok, ms = 15000) => new Promise((resolve, reject) => {
  const t0 = Date.now();
  const tick = () => ok() ? resolve() : Date.now() - t0 > ms ? reject('timeout') : setTimeout(tick, 50);
  tick();
});
window.addEventListener('load', async () => {
  const res = {};
  try {
    await wait(() => document.getElementById('error').textContent);
    res.before = [document.getElementById('error').textContent, document.querySelectorAll('#adapter option').length];
    const token = document.getElementById('token');
    token.value = 'page-token'; token.dispatchEvent(new Event('change'));
    await wait(() => document.querySelectorAll('#adapter option').length > 0);
    res.errorAfter = document.getElementById('error').textContent;
    const c = document.createElement('canvas'); c.width = 24; c.height = 16;
    const blob = await new Promise(r => c.toBlob(r, 'image/png'));
    const dt = new DataTransfer(); dt.items.add(new File([blob], 'x.png', {type: 'image/png'}));
    document.getElementById('image').files = dt.files;
    document.getElementById('adapter').value = 'lora_qv';
    document.getElementById('form').requestSubmit();
    await wait(() => document.getElementById('answer').dataset.done || document.getElementById('error').textContent);
    res.rows = document.querySelectorAll('#answer tr').length;
    res.error = document.getElementById('error').textContent;
  } catch (e) { res.failed = String(e); }
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script></body>"""


def test_page_sends_the_token_typed_into_it(tmp_path):
    """With a token, the page loads (it holds no data), says the listing needs the token, and once it is typed in
    lists the adapters and answers a prediction (both requests send it)."""
    if _chromium() is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    folder = h.make_folder(tmp_path / "deltas", {"lora_qv": h.SHARED["lora_qv"]}, segmentation=False)
    app = create_app(AdapterStore(h.backbone(), folder), max_wait_ms=1, token="page-token")
    res = _probe_in_chromium(app, TOKEN_PROBE, tmp_path)
    assert res["before"] == ["401: this server needs a token: send the header 'Authorization: Bearer <token>'", 0]
    assert res["errorAfter"] == "" and res["error"] == "" and res["rows"] == 4, res


# ---- detection and video ----------------------------------------------------------------------------------------
TASKS_PROBE = """<script>
const wait = (ok, ms = 20000) => new Promise((resolve, reject) => {
  const t0 = Date.now();
  const tick = () => ok() ? resolve() : Date.now() - t0 > ms ? reject('timeout') : setTimeout(tick, 50);
  tick();
});
let last = null;  // the JSON of the last prediction, as the page received it
const pageFetch = window.fetch;
window.fetch = async (...args) => {
  const res = await pageFetch(...args);
  if (String(args[0]).includes('/v1/predict')) last = await res.clone().json();
  return res;
};
async function submit(adapter, input, file) {
  const sel = document.getElementById('adapter');
  sel.value = adapter; sel.dispatchEvent(new Event('change'));
  const dt = new DataTransfer(); dt.items.add(file);
  document.getElementById(input).files = dt.files;
  delete document.getElementById('answer').dataset.done; last = null;
  document.getElementById('form').requestSubmit();
  await wait(() => document.getElementById('answer').dataset.done || document.getElementById('error').textContent);
}
window.addEventListener('load', async () => {
  const res = {};
  try {
    await wait(() => document.querySelectorAll('#adapter option').length > 0);
    const c = document.createElement('canvas'); c.width = 80; c.height = 60;
    const ctx = c.getContext('2d'); ctx.fillStyle = '#3264c8'; ctx.fillRect(0, 0, 80, 60);
    const png = await new Promise(r => c.toBlob(r, 'image/png'));
    await submit('det', 'image', new File([png], 'x.png', {type: 'image/png'}));
    const boxes = document.getElementById('boxes');
    res.det = {error: document.getElementById('error').textContent, sent: last && last.detections.length,
      labels: last && last.detections.map(d => d.label), hidden: boxes.hidden,
      viewBox: boxes.getAttribute('viewBox'), rects: boxes.querySelectorAll('rect').length,
      texts: Array.from(boxes.querySelectorAll('text')).map(t => t.textContent),
      image: !!(boxes.querySelector('image') && boxes.querySelector('image').getAttribute('href')),
      rows: document.querySelectorAll('#answer tr').length};
    const clip = await (await pageFetch('/probe/clip.mp4')).blob();
    await submit('vid', 'video', new File([clip], 'clip.mp4', {type: 'video/mp4'}));
    res.vid = {error: document.getElementById('error').textContent,
      sent: last && last.predictions && last.predictions.map(p => p.label),
      imageDisabled: document.getElementById('image').disabled,
      videoShown: !document.getElementById('video_input').hidden,
      boxesHidden: document.getElementById('boxes').hidden,
      cells: Array.from(document.querySelectorAll('#answer td')).map(td => td.textContent),
      text: document.getElementById('answer').textContent};
  } catch (e) { res.failed = String(e); }
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script></body>"""

DSIZE = 64  # FCOS's GroupNorm head needs more than one value per group (as in test_serve_tasks)


def _headless():
    from vpeft.run import build_backbone

    model = build_backbone("test_vit", h.BASE_CLASSES, DSIZE, pretrained=False).eval()
    model.reset_classifier(0)
    return model


def test_page_draws_detections_and_answers_a_video_file(tmp_path):
    """A detection adapter's boxes are drawn over the uploaded image (one rect and one "class score" text per box of
    the JSON answer); picking a video adapter swaps the image input for a video one, and the uploaded clip's
    classes are listed by name."""
    if _chromium() is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    import torch

    import vpeft
    from vpeft.data.video import write_clip
    from vpeft.run import build_backbone
    from vpeft.tasks.detection import DetectionTask
    from vpeft.tasks.video import VideoTask

    folder = tmp_path / "deltas"
    folder.mkdir()
    det = DetectionTask(("cat", "dog"), detector="fcos").build(_headless()).eval()
    vpeft.apply(det, "lora", r=2, targets=["q", "v"])
    h.perturb(det, 60)
    with torch.no_grad():  # scores well above the detector's threshold: boxes to draw
        for n, p in det.named_parameters():
            if n.endswith("cls_logits.bias"):
                p.fill_(1.0)
    vpeft.save(det, folder / "det.safetensors")
    vid = VideoTask(num_classes=3, num_frames=2).build(_headless()).eval()
    vpeft.apply(vid, "lora", r=2)
    h.perturb(vid, 71)
    vpeft.save(vid, folder / "vid.safetensors", extra={"class_names": ["run", "jump", "sit"]})
    clip = tmp_path / "clip.mp4"
    rng = np.random.default_rng(1)
    write_clip(clip, rng.integers(0, 255, (6, 48, 40, 3), dtype=np.uint8))
    store = AdapterStore(build_backbone("test_vit", h.BASE_CLASSES, DSIZE, pretrained=False), folder)
    app = create_app(store, max_wait_ms=1)

    @app.get("/probe/clip.mp4")
    async def clip_file():
        from fastapi.responses import Response

        return Response(clip.read_bytes(), media_type="video/mp4")

    res = _probe_in_chromium(app, TASKS_PROBE, tmp_path)
    d = res["det"]
    assert d["error"] == "" and not d["hidden"] and d["image"], d
    assert d["viewBox"] == "0 0 80 60", "the boxes are drawn in the uploaded image's own pixels"
    assert d["sent"] >= 1 and d["rects"] == d["sent"] == len(d["texts"]), "one drawn box per box of the answer"
    assert d["rows"] == d["sent"] + 1, "a header row and one row per box"
    assert set(d["labels"]) <= {"cat", "dog"}
    for label, text in zip(d["labels"], d["texts"]):
        assert re.fullmatch(rf"{label} \d\.\d\d", text), (label, text)
    v = res["vid"]
    assert v["error"] == "" and v["imageDisabled"] and v["videoShown"] and v["boxesHidden"], v
    assert "vid (video)" in v["text"], v["text"]
    assert v["sent"] and set(v["sent"]) == {"run", "jump", "sit"}, "top 5 of 3 classes: all, by name"
    assert v["cells"][::2] == v["sent"], "the page lists the answer's classes in its order"
