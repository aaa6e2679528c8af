"""vpeft.serve core: the adapter store (scan, refusal, LRU cache, pins) and mixed batches on one backbone.

Shared adapters (LoRA, adapter, SSF, linear: one MultiTaskModel forward) match each adapter's own model within 1e-5,
not bit-exactly: the multi-task layers compute a LoRA'd Linear with a temporary merged weight ``W + s B A`` for large
task groups and the other groups' low-rank terms as separate GEMMs, which rounds differently from ``W x + s B (A x)``
of the single-task wrapper. Own-model adapters (VPT, BitFit, segmentation) run the same modules on the same weights
as ``vpeft.load`` onto a fresh backbone, so their outputs are compared bit for bit.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import serve_helpers as h
import torch

import vpeft
from vpeft.errors import ConfigError, UnknownNameError
from vpeft.serve import OWN, SHARED, AdapterRefusedError, AdapterStore, DynamicBatcher


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return h.make_folder(tmp_path_factory.mktemp("deltas"))


def store_of(folder, **kwargs) -> AdapterStore:
    return AdapterStore(h.backbone(), folder, **kwargs)


def test_scan_routes_and_lazy_loading(folder):
    store = store_of(folder)
    infos = {i.id: i for i in store.adapters()}
    assert set(infos) == {*h.SHARED, *h.OWN, "seg"}
    assert all(infos[n].route == SHARED for n in h.SHARED) and all(infos[n].route == OWN for n in [*h.OWN, "seg"])
    assert infos["seg"].kind == "segmentation" and infos["seg"].classes == ["sky", "road", "car"]
    assert infos["lora_fc"].num_classes == 7 and infos["lora_fc"].classes is None and infos["lora_fc"].parameters > 0
    assert not any(i.loaded for i in infos.values()), "nothing is loaded before it is used"
    assert store.stats().loaded == 0


def test_mixed_batch_matches_each_adapters_own_model(folder):
    store = store_of(folder, capacity=None)
    names = [*h.SHARED, *h.SHARED][::-1] + ["lora_qv"]
    x = h.images(len(names))
    calls = []
    store.backbone.register_forward_hook(lambda *a: calls.append(1))
    out = store.run(names, x)
    assert len(calls) == 1, "one backbone forward for the whole mixed batch"
    for i, name in enumerate(names):
        with torch.inference_mode():
            expected = h.reference(folder, name)(x)[i]
        assert out[i].shape == expected.shape
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    for name in [*h.OWN, "seg"]:  # own models: the same computation as vpeft.load onto a fresh backbone
        with torch.inference_mode():
            expected = h.reference(folder, name)(x)
        got = torch.stack(store.run([name] * len(x), x))
        assert torch.equal(got, expected), name


def test_own_models_share_the_frozen_backbone(folder):
    store = store_of(folder, capacity=None)
    shared = {id(p) for p in store.backbone.parameters()}
    for name in ("vpt", "seg", "bitfit"):
        store.load(name)
        model = store.model_of(name)
        own = [p for p in model.parameters() if id(p) not in shared]
        info = store.info(name)
        assert 0 < sum(p.numel() for p in own) < sum(p.numel() for p in store.backbone.parameters()) / 2
        assert info.loaded_bytes == sum(p.numel() * p.element_size() for p in own) + sum(
            b.numel() * b.element_size() for b in model.buffers() if id(b) not in shared
        )
    # BitFit trains the backbone's biases: its model has its own copies, the backbone's stay untouched
    before = {n: p.clone() for n, p in h.backbone().named_parameters()}
    for n, p in store.backbone.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_lru_eviction_order_and_counts(folder):
    store = store_of(folder, capacity=2)
    x = h.images(1)
    for name in ("lora_qv", "adapter", "lora_qv", "ssf"):  # adapter is the least recently used when ssf comes
        store.run([name], x)
    loaded = {i.id for i in store.adapters() if i.loaded}
    assert loaded == {"lora_qv", "ssf"}
    infos = {i.id: i for i in store.adapters()}
    assert infos["adapter"].evictions == 1 and infos["lora_qv"].evictions == 0
    assert (infos["lora_qv"].hits, infos["lora_qv"].misses) == (1, 1)
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.evictions, stats.loaded) == (1, 3, 3, 1, 2)
    store.run(["vpt"], x)  # an own model counts against the same capacity
    assert {i.id for i in store.adapters() if i.loaded} == {"ssf", "vpt"}
    # a batch needing more adapters than the capacity holds them all while it runs, then the cache trims
    out = store.run(["lora_qv", "adapter", "linear"], h.images(3))
    assert len(out) == 3 and store.stats().loaded == 3
    store.run(["ssf"], x)
    assert store.stats().loaded == 2


def test_byte_capacity(folder):
    one = 2 * store_of(folder).info("lora_qv").delta_bytes
    store = store_of(folder, capacity=None, capacity_bytes=one + 1)
    store.run(["lora_qv"], h.images(1))
    store.run(["lora_fc"], h.images(1))
    assert [i.id for i in store.adapters() if i.loaded] == ["lora_fc"], "two adapters exceed the byte capacity"
    assert store.info("lora_qv").evictions == 1


def test_pinning(folder):
    store = store_of(folder, capacity=2)
    assert store.load("lora_qv", pin=True).pinned
    for name in ("adapter", "ssf", "linear", "vpt"):
        store.run([name], h.images(1))
    loaded = {i.id for i in store.adapters() if i.loaded}
    assert loaded == {"lora_qv", "vpt"}, "a pinned adapter is never evicted"
    store.load("vpt", pin=True)
    with pytest.raises(ConfigError, match="2 pinned adapters fill the cache capacity of 2"):
        store.load("ssf", pin=True)
    store.unload("vpt")  # explicit unload drops the pin too
    assert not store.info("vpt").loaded and not store.info("vpt").pinned
    assert store.info("vpt").evictions == 0, "an explicit unload is not an eviction"


def test_refusal_reasons(folder, tmp_path):
    other = tmp_path / "mixed"
    h.make_folder(other, {"good": h.SHARED["lora_qv"]}, segmentation=False)
    # other weights of the same backbone: a random test_vit built with 7 classes (its init differs)
    model = vpeft.run.build_backbone("test_vit", 7, h.SIZE, pretrained=False)
    vpeft.apply(model, "lora")
    vpeft.save(model, other / "other_weights.safetensors")
    # another input size
    model = vpeft.run.build_backbone("test_vit", h.BASE_CLASSES, 64, pretrained=False)
    vpeft.apply(model, "lora")
    vpeft.save(model, other / "big_input.safetensors")
    # another backbone
    model = vpeft.run.build_backbone("vit_tiny_patch16_224", h.BASE_CLASSES, h.SIZE, pretrained=False)
    vpeft.apply(model, "lora")
    vpeft.save(model, other / "tiny.safetensors")
    (other / "broken.safetensors").write_bytes(b"not a delta")
    (other / "bad name.safetensors").write_bytes((other / "good.safetensors").read_bytes())
    store = store_of(other)
    refused = {i.id: i.refused for i in store.adapters() if i.refused}
    assert store.ids == ["good"]
    assert "belongs to other weights of 'test_vit'" in refused["other_weights"]
    assert "trained at 64x64 inputs; this 'test_vit' takes 32x32" in refused["big_input"]
    assert "trained on backbone 'vit_tiny_patch16_224', not 'test_vit'" in refused["tiny"]
    assert "truncated or not a safetensors file" in refused["broken"]
    assert "has characters other than" in refused["bad name"]
    with pytest.raises(AdapterRefusedError, match="adapter 'tiny' is not served: checkpoint 'tiny.safetensors'"):
        store.run(["tiny"], h.images(1))
    with pytest.raises(UnknownNameError, match="unknown adapter 'god'. Did you mean 'good'"):
        store.info("god")


@pytest.mark.parametrize("bad", ["../good", "/etc/passwd", "a/b", "..", ".hidden", "x\\y"])
def test_only_names_inside_the_folder(folder, bad):
    with pytest.raises(ConfigError, match="is a path|other than"):
        store_of(folder).info(bad)


def test_unshareable_delta_falls_back_to_own_model(tmp_path, monkeypatch):
    """An adapter routed to the shared forward whose delta MultiTaskModel refuses runs on its own model (DoRA,
    declared shareable here to reach the fallback)."""
    import vpeft.serve.store as store_module

    real = store_module.supported_methods
    monkeypatch.setattr(store_module, "supported_methods", lambda b: [*real(b), "dora"])
    other = tmp_path / "dora"
    h.make_folder(other, {"plain": h.SHARED["lora_qv"], "dora": ("dora", {"r": 2}, 3)}, segmentation=False)
    store = store_of(other)
    assert store.info("dora").route == SHARED
    x = h.images(2)
    out = store.run(["plain", "dora"], x)
    info = store.info("dora")
    assert info.route == OWN and "cannot be selected per sample" in info.note
    model = h.classification_model(3)
    vpeft.load(model, other / "dora.safetensors")
    with torch.inference_mode():
        torch.testing.assert_close(out[1], model.eval()(x)[1], atol=1e-5, rtol=0)
    assert store.info("plain").route == SHARED and store.info("plain").loaded


# ---- the dynamic batcher ----------------------------------------------------------------------------------------
def test_concurrent_requests_share_one_backbone_forward(folder):
    store = store_of(folder, capacity=None)
    names = [*h.SHARED, "lora_qv", "vpt"]
    x = h.images(len(names), seed=3)
    single = {}
    with DynamicBatcher(store, max_batch_size=1, max_wait_ms=0) as batcher:  # one request at a time
        for i, name in enumerate(names):
            single[i] = batcher.predict(name, x[i], timeout=60)
    forwards, records = [], []
    store.backbone.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    with DynamicBatcher(store, max_batch_size=len(names), max_wait_ms=30_000, on_batch=records.append) as batcher:
        with ThreadPoolExecutor(len(names)) as pool:  # every request from its own thread
            futures = list(pool.map(lambda i: batcher.submit(names[i], x[i]), range(len(names))))
        results = [f.result(timeout=60) for f in futures]
    assert forwards == [len(names) - 1], "the shared adapters' requests ran as one backbone forward"
    assert len(records) == 1 and records[0].size == len(names)
    assert records[0].groups == {SHARED: len(names) - 1, "own:vpt": 1}
    for i, name in enumerate(names):
        torch.testing.assert_close(results[i], single[i], atol=1e-5, rtol=0, msg=name)


def test_batches_wait_at_most_max_wait_ms(folder):
    store = store_of(folder)
    records = []
    with DynamicBatcher(store, max_batch_size=64, max_wait_ms=20, on_batch=records.append) as batcher:
        batcher.predict("lora_qv", h.images(1)[0], timeout=60)  # loads it
        start = time.monotonic()
        batcher.predict("lora_qv", h.images(1)[0], timeout=60)
        assert time.monotonic() - start < 5, "a lone request runs once max_wait_ms have passed"
    assert [r.size for r in records] == [1, 1]


def test_a_failing_group_fails_only_its_requests(folder):
    store = store_of(folder)
    with DynamicBatcher(store, max_batch_size=2, max_wait_ms=30_000) as batcher:
        bad = batcher.submit("vpt", torch.zeros(3, 8, 8))  # the wrong input size for the backbone
        good = batcher.submit("lora_qv", h.images(1)[0])
        assert good.result(timeout=60).shape == (3,)
        with pytest.raises(Exception, match="8"):
            bad.result(timeout=60)
        batcher.max_wait = 0.0
        assert batcher.predict("vpt", h.images(1)[0], timeout=60).shape == (3,), "the worker lives on"
    with pytest.raises(UnknownNameError):
        DynamicBatcher(store).start().submit("nope", h.images(1)[0])
    with pytest.raises(ConfigError, match="max_batch_size=0"):
        DynamicBatcher(store, max_batch_size=0)
