"""The HTTP API of vpeft serve (FastAPI's TestClient), on timm's tiny random test_vit at 32 px."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import serve_helpers as h
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vpeft[serve]')")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client (pip install 'vpeft[serve]')")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from vpeft.serve import AdapterStore, create_app  # noqa: E402
from vpeft.serve.codec import transform_for  # noqa: E402

TASKS = {k: v for k, v in {**h.SHARED, **h.OWN}.items() if k in ("lora_qv", "adapter", "vpt")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = h.make_folder(tmp_path_factory.mktemp("deltas"), TASKS)
    h.write_classification(folder / "named.safetensors", "ssf", {}, 3, 11, class_names=["cat", "dog", "bird"])
    (folder / "broken.safetensors").write_bytes(b"\0" * 10)
    return folder


@pytest.fixture(scope="module")
def client(folder):
    store = AdapterStore(h.backbone(), folder, capacity=3)
    app = create_app(store, max_batch_size=8, max_wait_ms=2, max_pixels=200 * 200, max_upload_bytes=2_000_000)
    with TestClient(app) as client:
        yield client


def png(width=40, height=30, seed=0, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def post(client, adapter, data=None, **fields):
    return client.post("/v1/predict", files={"image": ("x.png", data or png(), "image/png")},
                       data={"adapter": adapter, **fields})  # fmt: skip


def expected_logits(folder, client, name, data):
    store = client.app.state.store
    image = Image.open(io.BytesIO(data)).convert("RGB")
    x = transform_for(store.backbone, store.info(name), store.input_size_for(name))(image)
    model = h.reference(folder, name)
    with torch.inference_mode():
        return model(x[None])[0]


def test_classification_multipart_and_json(folder, client):
    data = png(seed=1)
    res = post(client, "lora_qv", data, top_k="2")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["adapter"] == "lora_qv" and body["kind"] == "classification" and len(body["predictions"]) == 2
    probs = torch.softmax(expected_logits(folder, client, "lora_qv", data), 0)
    top = probs.topk(2)
    assert [p["index"] for p in body["predictions"]] == top.indices.tolist()
    assert [p["label"] for p in body["predictions"]] == [None, None], "no class names recorded: indices"
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], top.values.tolist(), atol=1e-5)
    res = client.post("/v1/predict", json={"adapter": "named", "image": base64.b64encode(data).decode(), "top_k": 9})
    assert res.status_code == 200, res.text
    preds = res.json()["predictions"]
    assert len(preds) == 3, "top_k past the class count answers every class"
    assert sorted(p["label"] for p in preds) == ["bird", "cat", "dog"]
    assert abs(sum(p["score"] for p in preds) - 1) < 1e-5


def test_segmentation_answer(folder, client):
    data = png(50, 20, seed=2)
    res = post(client, "seg", data)
    assert res.status_code == 200, res.text
    body = res.json()
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert mask.shape == (20, 50) and (body["width"], body["height"]) == (50, 20), "the mask at the image's size"
    assert body["classes"] == ["sky", "road", "car"] and body["num_classes"] == 3
    from vpeft.tasks.segmentation import resize_logits

    logits = expected_logits(folder, client, "seg", data)
    expected = resize_logits(logits[None], (20, 50))[0].argmax(0).numpy()
    assert (mask == expected).mean() > 0.999  # argmax ties aside: the same classes pixel for pixel
    assert abs(sum(p["fraction"] for p in body["present"]) - 1) < 1e-6
    assert {p["label"] for p in body["present"]} <= {"sky", "road", "car"}


def test_adapters_listing_load_unload_and_health(client):
    res = client.get("/v1/adapters")
    assert res.status_code == 200
    body = res.json()
    adapters = {a["id"]: a for a in body["adapters"]}
    assert body["backbone"] == "test_vit" and body["input_size"] == [32, 32]
    assert set(adapters) == {"lora_qv", "adapter", "vpt", "seg", "named", "broken"}
    assert "truncated or not a safetensors file" in adapters["broken"]["refused"]
    assert adapters["named"]["classes"] == ["cat", "dog", "bird"] and adapters["named"]["parameters"] > 0
    assert adapters["vpt"]["route"] == "own" and adapters["adapter"]["route"] == "shared"
    res = client.post("/v1/adapters/adapter/load", params={"pin": "true"})
    assert res.status_code == 200 and res.json()["loaded"] and res.json()["pinned"]
    res = client.post("/v1/adapters/adapter/unload")
    assert res.status_code == 200 and not res.json()["loaded"] and not res.json()["pinned"]
    assert client.post("/v1/adapters/nope/load").status_code == 404
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["adapters"] == 5


def test_metrics(client):
    assert post(client, "lora_qv").status_code == 200
    assert post(client, "nope").status_code == 404
    text = client.get("/metrics").text
    for line in (
        'vpeft_serve_requests_total{adapter="lora_qv",status="200"}',
        'vpeft_serve_requests_total{adapter="unknown",status="404"}',
        'vpeft_serve_request_latency_seconds_count{adapter="lora_qv"}',
        "vpeft_serve_batch_size_count",
        "vpeft_serve_queue_depth 0.0",
        'vpeft_serve_cache_hits_total{adapter="lora_qv"}',
        'vpeft_serve_cache_misses_total{adapter="lora_qv"}',
        'vpeft_serve_cache_loads_total{adapter="lora_qv"}',
        'vpeft_serve_cache_evictions_total{adapter="lora_qv"}',
        "vpeft_serve_adapters_loaded ",
    ):
        assert line in text, line


def _truncated() -> bytes:
    return png(120, 120, seed=3)[:-200]


@pytest.mark.parametrize(
    "case,status,message",
    [
        ({"adapter": "lora_qv", "data": b"hello, not an image"}, 400, "not an image Pillow can read"),
        ({"adapter": "lora_qv", "data": "truncated"}, 400, "truncated or corrupt"),
        ({"adapter": "lora_qv", "data": "large"}, 413, "201x200 = 40200 pixels; this server takes at most 40000"),
        ({"adapter": "lora_qvv"}, 404, "unknown adapter 'lora_qvv'. Did you mean 'lora_qv'"),
        ({"adapter": "../lora_qv"}, 422, "is a path"),
        ({"adapter": "broken"}, 409, "adapter 'broken' is not served"),
        ({"adapter": "lora_qv", "top_k": "0"}, 422, "top_k must be an integer >= 1, got 0"),
        ({"adapter": "lora_qv", "top_k": "abc"}, 422, "top_k must be an integer >= 1, got 'abc'"),
    ],
)
def test_bad_input_is_one_json_error(client, case, status, message):
    data = {"truncated": _truncated(), "large": png(201, 200)}.get(case.get("data"), case.get("data"))
    fields = {"top_k": case["top_k"]} if "top_k" in case else {}
    res = post(client, case["adapter"], data if isinstance(data, bytes) else None, **fields)
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) <= {"error", "status", "valid"} and message in body["error"], body
    if status == 404:
        assert body["valid"] == ["adapter", "lora_qv", "named", "seg", "vpt"]
    assert client.get("/health").json()["status"] == "ok", "the server keeps serving"


@pytest.mark.parametrize(
    "kwargs,status,message",
    [
        ({"json": {"adapter": "lora_qv", "image": "%%%"}}, 400, "not valid base64"),
        ({"json": {"adapter": "lora_qv", "image": "", "top_k": 2}}, 400, "non-empty base64"),
        ({"json": {"adapter": "lora_qv", "image": "aGk=", "top_k": True}}, 422, "got True"),
        ({"json": {"adapter": "lora_qv", "img": "aGk="}}, 422, "unknown field(s) ['img']"),
        ({"json": ["not", "an", "object"]}, 400, "must be an object"),
        ({"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"raw", "headers": {"content-type": "image/png"}}, 400, "content type 'image/png'"),
        ({"data": {"adapter": "lora_qv"}}, 400, "no 'image' file field"),
        ({"json": {"image": "aGk="}}, 422, "adapter must be a non-empty adapter id"),
    ],
)
def test_bad_requests(client, kwargs, status, message):
    res = client.post("/v1/predict", **kwargs)
    assert res.status_code == status, res.text
    assert message in res.json()["error"]


def test_upload_byte_limit(client):
    res = post(client, "lora_qv", b"\0" * 2_100_000)
    assert res.status_code == 413 and "at most 2000000" in res.json()["error"]


def test_page(client):
    res = client.get("/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    assert 'id="adapter"' in res.text and 'type="file"' in res.text and "/v1/predict" in res.text
    assert "http://" not in res.text and "https://" not in res.text, "no external resources"
