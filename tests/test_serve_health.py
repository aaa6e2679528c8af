"""vpeft serve over real HTTP (uvicorn on a free loopback port): ``/health``, ``/metrics`` and ``/v1/adapters``
answer while a batch runs (the batch holds the store's lock from grouping to its last forward; none of these
endpoints waits for it)."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import serve_helpers as h

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vpeft[serve]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vpeft[serve]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx")

from vpeft.serve import AdapterStore, create_app  # noqa: E402


def test_health_metrics_and_listing_answer_while_a_batch_is_held(tmp_path):
    folder = h.make_folder(tmp_path / "d", {"lora_qv": h.SHARED["lora_qv"]}, segmentation=False)
    store = AdapterStore(h.backbone(), folder)
    entered, release = threading.Event(), threading.Event()

    def hold(module, args):  # the batch's backbone forward waits (holding the store) until the test releases it
        entered.set()
        assert release.wait(30), "the test never released the batch"

    store.backbone.patch_embed.register_forward_pre_hook(hold)
    body = {"adapter": "lora_qv", "image": base64.b64encode(h.png_bytes()).decode(), "top_k": 2}
    with h.serving(create_app(store, max_wait_ms=1)) as url, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}/v1/predict", json=body, timeout=60)
        try:
            assert entered.wait(30), "the batch did not reach its forward"
            with httpx.Client(base_url=url, timeout=5) as c:  # a handler that waited for the batch times out here
                health, metrics, listing = c.get("/health"), c.get("/metrics"), c.get("/v1/adapters")
            held = not pending.done()
        finally:
            release.set()
        res = pending.result(60)
    assert held, "the prediction was still running while the three requests were answered"
    assert health.status_code == 200, health.text
    assert health.json() | {"backbone": None} == {"status": "ok", "backbone": None, "adapters": 1, "loaded": 1,
                                                  "queue_depth": 0, "in_flight": 1}  # fmt: skip
    assert metrics.status_code == 200 and "vpeft_serve_adapters_loaded 1.0" in metrics.text, metrics.text[-2000:]
    assert "vpeft_serve_requests_in_flight 1.0" in metrics.text, "the held prediction is in flight"
    assert listing.status_code == 200 and listing.json()["adapters"][0]["loaded"] is True
    assert res.status_code == 200 and len(res.json()["predictions"]) == 2, res.text
