"""vpeft serve over real HTTP (uvicorn on a free loopback port): zero-shot CLIP, detection and video adapters answered
as the library's own forward answers on the same inputs (prepared by the library's own data path: the task's
dataset), mixed with classification in one batch; and ``POST /v1/adapters/rescan``.

The inputs of the oracles come from the library's datasets (``ZeroShotTask`` / ``DetectionTask`` / ``VideoTask``
``.dataset`` over a folder holding the very files sent), not from the server's code, so a server that prepared an
input differently (another resize, other frames of a clip) fails as surely as one that ran the wrong adapter.
Outputs are compared to 1e-5: the server may batch a request with others, which changes the GEMMs' summation order.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import serve_helpers as h
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vpeft[serve]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vpeft[serve]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx")

from PIL import Image  # noqa: E402

import vpeft  # noqa: E402
from vpeft.data import build_transform  # noqa: E402
from vpeft.data.video import write_clip  # noqa: E402
from vpeft.errors import UnknownNameError  # noqa: E402
from vpeft.run import build_backbone  # noqa: E402
from vpeft.serve import AdapterRefusedError, AdapterStore, DynamicBatcher, create_app  # noqa: E402
from vpeft.tasks import ZeroShotTask  # noqa: E402
from vpeft.tasks.detection import DetectionTask  # noqa: E402
from vpeft.tasks.video import VideoTask  # noqa: E402

B64 = lambda data: base64.b64encode(data).decode()  # noqa: E731


def scores_of(body: dict, k: int) -> torch.Tensor:
    """The answer's softmax scores as a vector in class order (every class asked for with top_k)."""
    out = torch.full((k,), float("nan"), dtype=torch.float64)
    for p in body["predictions"]:
        out[p["index"]] = p["score"]
    return out


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float().flatten(), 0).double()


# ---- rescan -----------------------------------------------------------------------------------------------------
def _classifier_ref(path: Path, classes: int) -> torch.nn.Module:
    model = h.classification_model(classes)
    vpeft.load(model, path)
    return model.eval()


def _expected_scores(model: torch.nn.Module, data: bytes) -> torch.Tensor:
    import io

    x = build_transform(model, input_size=h.SIZE)(Image.open(io.BytesIO(data)).convert("RGB"))
    with torch.inference_mode():
        return softmax(model(x[None])[0])


def test_rescan_adds_removes_replaces_and_refuses_with_the_reason(tmp_path):
    folder = h.make_folder(tmp_path / "d", {"a": h.SHARED["lora_qv"], "own": h.OWN["vpt"]}, segmentation=False)
    store = AdapterStore(h.backbone(), folder)
    data = h.png_bytes(seed=4)
    with h.serving(create_app(store, max_wait_ms=1)) as url, httpx.Client(base_url=url, timeout=120) as c:

        def predict(name: str) -> httpx.Response:
            return c.post("/v1/predict", json={"adapter": name, "image": B64(data), "top_k": 10})

        assert predict("a").status_code == 200 and predict("own").status_code == 200  # both loaded now
        h.write_classification(folder / "new.safetensors", "ssf", {}, 4, seed=21)
        (folder / "a.safetensors").unlink()
        raw = bytearray((folder / "new.safetensors").read_bytes())
        raw[-3] ^= 0xFF  # one tensor byte: the header parses, the content digest does not match
        (folder / "tampered.safetensors").write_bytes(bytes(raw))
        (folder / "junk.safetensors").write_bytes(b"\x00" * 7)
        h.write_classification(folder / "own.safetensors", "vpt_deep", {"num_tokens": 2}, 3, seed=33)  # replaced
        res = c.post("/v1/adapters/rescan")
        assert res.status_code == 200, res.text
        body = res.json()
        assert (body["added"], body["removed"], body["changed"]) == (["junk", "new", "tampered"], ["a"], ["own"])
        assert sorted(body["refused"]) == ["junk", "tampered"] and body["served"] == ["new", "own"]
        assert "contents do not match the content_sha256" in body["refused"]["tampered"], body["refused"]
        assert "truncated or not a safetensors file" in body["refused"]["junk"]

        gone = predict("a")
        assert gone.status_code == 404 and "unknown adapter 'a'" in gone.json()["error"]
        assert gone.json()["valid"] == ["new", "own"]
        bad = predict("tampered")
        assert bad.status_code == 409 and "content_sha256" in bad.json()["error"]
        listing = {a["id"]: a for a in c.get("/v1/adapters").json()["adapters"]}
        assert set(listing) == {"junk", "new", "own", "tampered"} and not listing["own"]["loaded"]
        assert listing["own"]["misses"] == 1, "the counters of a replaced file carry over (one series per id)"
        for name, classes in (("new", 4), ("own", 3)):  # the new files' deltas answer, not what was loaded before
            res = predict(name)
            assert res.status_code == 200, res.text
            want = _expected_scores(_classifier_ref(folder / f"{name}.safetensors", classes), data)
            torch.testing.assert_close(scores_of(res.json(), classes), want, atol=1e-5, rtol=0)
        again = c.post("/v1/adapters/rescan").json()
        assert (again["added"], again["removed"], again["changed"], again["refused"]) == ([], [], [], {})
        assert c.get("/v1/adapters").json()["adapters"][2]["loaded"], "an unchanged loaded adapter stays loaded"
        assert c.get("/health").json()["adapters"] == 2


def test_a_rescan_waits_for_the_running_batch(tmp_path, monkeypatch):
    """A rescan that removes an adapter while a batch holding it is being formed runs after that batch: the
    batch's requests (for the removed adapter and its batch-mates) finish; later ones get "unknown adapter"."""
    folder = h.make_folder(tmp_path / "d", {"a": h.SHARED["lora_qv"], "b": h.SHARED["adapter"]}, segmentation=False)
    store = AdapterStore(h.backbone(), folder)
    store.load("a"), store.load("b")
    x = h.images(2, seed=5)
    expected = {}
    for i, name in enumerate("ab"):
        with torch.inference_mode():
            expected[name] = _classifier_ref(folder / f"{name}.safetensors", {"a": 3, "b": 5}[name])(x[i : i + 1])[0]
    real, calls, rescans, during = store.group_of, [], [], []

    def group_of(name: str) -> str:
        group = real(name)
        calls.append(name)
        if len(calls) == 2:  # the whole batch is grouped: remove 'a' and rescan from another thread now
            (folder / "a.safetensors").unlink()
            thread = threading.Thread(target=lambda: rescans.append(store.rescan()))
            thread.start()
            thread.join(1.0)
            during.append(thread.is_alive())
            rescans.append(thread)
        return group

    monkeypatch.setattr(store, "group_of", group_of)
    with DynamicBatcher(store, max_batch_size=2, max_wait_ms=30_000) as batcher:
        fa, fb = batcher.submit("a", x[0]), batcher.submit("b", x[1])
        out = {"a": fa.result(timeout=60), "b": fb.result(timeout=60)}
        rescans[0].join(60)
        assert during == [True], "the rescan waited for the batch"
        assert rescans[1].removed == ["a"]
        with pytest.raises(UnknownNameError, match="unknown adapter 'a'"):
            batcher.submit("a", x[0])
    for name in "ab":
        torch.testing.assert_close(out[name], expected[name], atol=1e-5, rtol=0)


def test_an_adapter_that_cannot_load_fails_only_its_own_requests_of_a_shared_batch(tmp_path):
    folder = h.make_folder(tmp_path / "d", {"b": h.SHARED["adapter"], "c": h.SHARED["ssf"]}, segmentation=False)
    store = AdapterStore(h.backbone(), folder)
    (folder / "c.safetensors").unlink()  # gone before its first use, no rescan yet
    x = h.images(3, seed=6)
    with DynamicBatcher(store, max_batch_size=3, max_wait_ms=30_000) as batcher:
        futures = [batcher.submit(n, x[i]) for i, n in enumerate("bcb")]
        with pytest.raises(AdapterRefusedError, match="adapter 'c' .*c.safetensors' does not exist"):
            futures[1].result(timeout=60)
        got = [futures[0].result(timeout=60), futures[2].result(timeout=60)]
    with torch.inference_mode():
        want = _classifier_ref(folder / "b.safetensors", 5)(x[[0, 2]])
    torch.testing.assert_close(torch.stack(got), want, atol=1e-5, rtol=0)
    assert store.rescan().removed == ["c"]


# ---- zero-shot CLIP ---------------------------------------------------------------------------------------------
ZS = {
    "animals": (("dog", "cat", "bird"), "lora", {"r": 2}),
    "scenes": (("red car", "blue sky", "green tree", "the sea"), "coop", {"num_tokens": 2}),
}


def _zero_shot_model(names, seed_model: int = 0):
    from vpeft.backbones.clip.testing import tiny_open_clip

    return ZeroShotTask(names).build(tiny_open_clip(seed=seed_model))


def _write_vtab(folder: Path, names, images: list[bytes]) -> Path:
    """A VTAB-format folder (classes.txt, test list) holding ``images``: the zero-shot task's own data path."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, data in enumerate(images):
        (folder / "images" / f"{i}.png").write_bytes(data)
        lines.append(f"images/{i}.png 0")
    for split in ("train800", "val200", "train800val200", "test"):
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (folder / "classes.txt").write_text("\n".join(n.replace(" ", "_") for n in names) + "\n")
    return folder


def test_zero_shot_clip_adapters_answer_as_the_library(tmp_path):
    from vpeft.backbones.clip.testing import tiny_open_clip

    folder = tmp_path / "deltas"
    folder.mkdir()
    for seed, (name, (names, method, options)) in enumerate(ZS.items()):
        model = _zero_shot_model(names)
        vpeft.apply(model, method, **options)
        h.perturb(model, 40 + seed)
        vpeft.save(model, folder / f"{name}.safetensors")
    images = [h.png_bytes(37, 23, seed=s) for s in range(3)]
    store = AdapterStore(tiny_open_clip(), folder)
    assert {i.id: i.kind for i in store.adapters()} == {"animals": "zeroshot", "scenes": "zeroshot"}
    requests = [(name, i) for name in ZS for i in range(len(images))]
    with h.serving(create_app(store, max_batch_size=8, max_wait_ms=50)) as url, httpx.Client(timeout=120) as c:
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(
                pool.map(
                    lambda r: c.post(
                        f"{url}/v1/predict",
                        files={"image": ("x.png", images[r[1]], "image/png")},
                        data={"adapter": r[0], "top_k": "9"},
                    ),  # fmt: skip
                    requests,
                )
            )
    for (name, i), res in zip(requests, answers):
        assert res.status_code == 200, res.text
        body = res.json()
        names = ZS[name][0]
        assert body["kind"] == "zeroshot" and {p["label"] for p in body["predictions"]} == set(names)
        assert all(p["label"] == names[p["index"]] for p in body["predictions"]), "labels are the class names"
        model = _zero_shot_model(names)
        vpeft.load(model, folder / f"{name}.safetensors")
        data = ZeroShotTask(names).dataset(_write_vtab(tmp_path / f"{name}{i}", names, [images[i]]), "test",
                                           model.backbone)  # fmt: skip
        with torch.inference_mode():
            want = softmax(model.eval()(data[0][0][None])[0])
        torch.testing.assert_close(scores_of(body, len(names)), want, atol=1e-5, rtol=0)


# ---- detection and video ----------------------------------------------------------------------------------------
DSIZE = 64  # FCOS's GroupNorm head needs more than one value per group: 64 px gives a 2x2 map at stride 32
DET = {"det": ("fcos", ("cat", "dog"), 60), "det2": ("retinanet", ("car", "bus", "bike"), 61)}
VID = {  # id: (task options, method, options, seed)
    "vid": ({"num_classes": 3, "num_frames": 4, "head": "temporal"}, "st_adapter", {}, 70),
    "vid2": ({"num_classes": 5, "num_frames": 2, "views": 2}, "lora", {"r": 2}, 71),
}


def _headless() -> torch.nn.Module:
    model = build_backbone("test_vit", h.BASE_CLASSES, DSIZE, pretrained=False).eval()
    model.reset_classifier(0)
    return model


def _det_model(name: str):
    detector, classes, _ = DET[name]
    return DetectionTask(classes, detector=detector).build(_headless()).eval()


def _vid_model(name: str):
    return VideoTask(**VID[name][0]).build(_headless()).eval()


def _cls_model():
    model = build_backbone("test_vit", h.BASE_CLASSES, DSIZE, pretrained=False).eval()
    model.reset_classifier(3)
    return model.eval()


def _clip_frames(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 48, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    folder = root / "deltas"
    folder.mkdir()
    for name in DET:
        model = _det_model(name)
        vpeft.apply(model, "lora", r=2, targets=["q", "v"])
        h.perturb(model, DET[name][2])
        with torch.no_grad():  # scores well above the detectors' 0.05 threshold: boxes to compare
            for n, p in model.named_parameters():
                if n.endswith("cls_logits.bias"):
                    p.fill_(1.0)
        vpeft.save(model, folder / f"{name}.safetensors")
    for name, (_, method, options, seed) in VID.items():
        model = _vid_model(name)
        vpeft.apply(model, method, **options)
        h.perturb(model, seed)
        vpeft.save(model, folder / f"{name}.safetensors")
    model = _cls_model()
    vpeft.apply(model, "lora", r=2, targets=["q", "v"])
    h.perturb(model, 80)
    vpeft.save(model, folder / "cls.safetensors", extra={"class_names": ["x", "y", "z"]})
    media = root / "media"
    write_clip(media / "clip.mp4", _clip_frames(9, 1))
    frames = media / "frames"
    frames.mkdir()
    for i, array in enumerate(_clip_frames(5, 2)):
        Image.fromarray(array).save(frames / f"{i:03d}.png")
    store = AdapterStore(build_backbone("test_vit", h.BASE_CLASSES, DSIZE, pretrained=False), folder, capacity=None)
    app = create_app(store, max_batch_size=64, max_wait_ms=3000, max_frames=64)
    records, metrics_hook = [], app.state.batcher.on_batch
    app.state.batcher.on_batch = lambda r: (records.append(r), metrics_hook(r))
    with h.serving(app) as url:
        yield {"url": url, "folder": folder, "media": media, "app": app, "root": root, "records": records}


def _det_expected(tasks, name: str, data: bytes) -> list[dict]:
    """The library's detections of ``data``: DetectionTask.dataset's canvas through the delta's model, boxes mapped
    back through the dataset's scale (its target's sx, sy) and clipped to the image."""
    detector, classes, _ = DET[name]
    folder = tasks["root"] / f"det-{name}-{len(data)}"
    (folder / "images" / "test").mkdir(parents=True)
    (folder / "images" / "test" / "1.png").write_bytes(data)
    w, h_ = Image.open(folder / "images" / "test" / "1.png").size
    doc = {
        "images": [{"id": 1, "file_name": "1.png", "width": w, "height": h_}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
        "categories": [{"id": i, "name": c} for i, c in enumerate(classes)],
    }
    (folder / "annotations").mkdir()
    (folder / "annotations" / "test.json").write_text(json.dumps(doc))
    model = _det_model(name)
    vpeft.load(model, tasks["folder"] / f"{name}.safetensors")
    canvas, target = DetectionTask(classes, detector=detector).dataset(folder, "test", model)[0]
    with torch.inference_mode():
        out = model(canvas[None])[0]
    sx, sy = float(target[0, 7]), float(target[0, 8])
    boxes = out["boxes"].double() / torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    boxes = boxes.clamp(min=0).minimum(torch.tensor([w, h_, w, h_], dtype=torch.float64))
    order = torch.argsort(out["scores"], descending=True, stable=True)
    return [{"box": boxes[i], "index": int(out["labels"][i]), "score": float(out["scores"][i])} for i in order]


def _vid_expected(tasks, name: str, clip: str) -> torch.Tensor:
    """The library's class scores of a clip: VideoTask.dataset's item (its frame sampling and transform)."""
    folder = tasks["root"] / f"vid-{name}-{clip}"
    folder.mkdir()
    task = VideoTask(**VID[name][0])
    (folder / "classes.txt").write_text("\n".join(f"c{i}" for i in range(task.num_classes)) + "\n")
    (folder / "test.txt").write_text(f"{tasks['media'] / clip} 0\n")
    model = _vid_model(name)
    vpeft.load(model, tasks["folder"] / f"{name}.safetensors")
    x = task.dataset(folder, "test", model.backbone)[0][0]
    with torch.inference_mode():
        return softmax(model(x[None])[0])


def test_detection_video_and_classification_in_one_batch_answer_as_the_library(tasks):
    media = tasks["media"]
    video = (media / "clip.mp4").read_bytes()
    frames = [(media / "frames" / f"{i:03d}.png").read_bytes() for i in range(5)]
    wide, tall = h.png_bytes(70, 40, seed=8), h.png_bytes(30, 50, seed=9)
    requests = [  # (adapter, what is sent, how)
        ("det", wide, "multipart"),
        ("det", tall, "json"),
        ("det2", wide, "multipart"),
        ("vid", video, "multipart-video"),
        ("vid", frames, "json-frames"),
        ("vid2", video, "json-video"),
        ("vid2", frames, "multipart-frames"),
        ("cls", tall, "json"),
    ]

    def send(req):
        adapter, payload, how = req
        url = f"{tasks['url']}/v1/predict"
        top_k = {"top_k": 9} if not adapter.startswith("det") else {}
        if how == "multipart":
            return httpx.post(url, files={"image": ("x.png", payload)}, data={"adapter": adapter, **top_k}, timeout=120)
        if how == "multipart-video":
            return httpx.post(url, files={"video": ("c.mp4", payload)}, data={"adapter": adapter, **top_k},
                              timeout=120)  # fmt: skip
        if how == "multipart-frames":
            files = [("frames", (f"{i}.png", f)) for i, f in enumerate(payload)]
            return httpx.post(url, files=files, data={"adapter": adapter, **top_k}, timeout=120)
        field = {"json": "image", "json-video": "video", "json-frames": "frames"}[how]
        value = [B64(f) for f in payload] if field == "frames" else B64(payload)
        return httpx.post(url, json={"adapter": adapter, field: value, **top_k}, timeout=120)

    batcher = tasks["app"].state.batcher
    records, batches = tasks["records"], batcher.batches
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(send, requests))
    deadline = time.monotonic() + 30  # the batch record is made after its answers are sent
    while len(records) < batcher.batches - batches and time.monotonic() < deadline:
        time.sleep(0.05)
    for (adapter, payload, how), res in zip(requests, answers):
        assert res.status_code == 200, (adapter, how, res.text)
        body = res.json()
        if adapter.startswith("det"):
            want = _det_expected(tasks, adapter, payload)
            got = body["detections"]
            assert body["kind"] == "detection" and body["classes"] == list(DET[adapter][1])
            assert (body["width"], body["height"]) == Image.open(__import__("io").BytesIO(payload)).size
            assert len(got) == len(want) > 0, (adapter, len(got), len(want))
            assert [d["index"] for d in got] == [d["index"] for d in want]
            assert all(d["label"] == DET[adapter][1][d["index"]] for d in got)
            np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], atol=1e-5, rtol=0)
            np.testing.assert_allclose([d["box"] for d in got], [d["box"].tolist() for d in want], atol=1e-3, rtol=0)
        elif adapter.startswith("vid"):
            want = _vid_expected(tasks, adapter, "clip.mp4" if "video" in how else "frames")
            assert body["kind"] == "video"
            torch.testing.assert_close(scores_of(body, len(want)), want, atol=1e-5, rtol=0)
        else:
            model = _cls_model()
            vpeft.load(model, tasks["folder"] / "cls.safetensors")
            want = _expected_scores_at(model, payload, DSIZE)
            torch.testing.assert_close(scores_of(body, 3), want, atol=1e-5, rtol=0)
            assert {p["label"] for p in body["predictions"]} == {"x", "y", "z"}
    mine = records[-(batcher.batches - batches) :]
    assert max(len(r.groups) for r in mine) >= 3, [r.groups for r in mine]  # kinds batched side by side


def _expected_scores_at(model, data: bytes, size: int) -> torch.Tensor:
    import io

    x = build_transform(model, input_size=size)(Image.open(io.BytesIO(data)).convert("RGB"))
    with torch.inference_mode():
        return softmax(model.eval()(x[None])[0])


def test_detection_top_k_caps_the_boxes(tasks):
    res = httpx.post(f"{tasks['url']}/v1/predict", json={"adapter": "det", "image": B64(h.png_bytes()), "top_k": 2},
                     timeout=120)  # fmt: skip
    assert res.status_code == 200, res.text
    scores = [d["score"] for d in res.json()["detections"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"adapter": "vid", "image": "png"}, 400, "'vid' is a video adapter: send 'video' (a video file) or 'frames'"),
        ({"adapter": "cls", "video": "mp4"}, 400, "'cls' is a classification adapter: send an 'image', not 'video'"),
        ({"adapter": "det", "frames": ["png"]}, 400, "'det' is a detection adapter: send an 'image', not 'frames'"),
        ({"adapter": "vid", "frames": ["png", "png"]}, 400, "2 frames were sent: a clip of 2 frames is shorter than"),
        ({"adapter": "vid", "video": "junk"}, 400, "not a video PyAV can decode"),
        ({"adapter": "vid", "frames": ["png"] * 65}, 413, "65 frames were sent; this server takes at most 64"),
        ({"adapter": "vid", "frames": "png"}, 400, "frames must be a list of base64 images"),
        ({"adapter": "vid", "frames": []}, 400, "frames is empty"),
        ({"adapter": "vid", "video": "mp4", "frames": ["png"]}, 400, "send one of image, video, frames; got video, fr"),
    ],
)
def test_bad_clips_are_one_json_error(tasks, body, status, message):
    values = {"png": B64(h.png_bytes(8, 8)), "mp4": B64((tasks["media"] / "clip.mp4").read_bytes()),
              "junk": B64(b"not a video at all")}  # fmt: skip
    body = {k: ([values[x] for x in v] if isinstance(v, list) else values.get(v, v)) for k, v in body.items()}
    res = httpx.post(f"{tasks['url']}/v1/predict", json=body, timeout=120)
    assert res.status_code == status, res.text
    assert message in res.json()["error"], res.json()
    assert httpx.get(f"{tasks['url']}/health", timeout=30).json()["status"] == "ok"
