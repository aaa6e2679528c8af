"""vpeft serve's access options against a real server (uvicorn in a thread, httpx over loopback): a bearer token
(every endpoint but GET /health and the page needs it; 401 JSON with WWW-Authenticate), CORS off by default and on
for exactly the origins given."""

from __future__ import annotations

import pytest
import serve_helpers as h

pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vpeft[serve]')")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vpeft[serve]')")
httpx = pytest.importorskip("httpx", reason="the test talks to the server with httpx")

from vpeft.errors import ConfigError  # noqa: E402
from vpeft.serve import AdapterStore, create_app  # noqa: E402
from vpeft.serve.cli import serve_token  # noqa: E402

TOKEN = "s3cret-Token_1"
ALLOWED = "https://app.example.com"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return h.make_folder(tmp_path_factory.mktemp("deltas"), {"lora_qv": h.SHARED["lora_qv"]}, segmentation=False)


def _app(folder, **access):
    return create_app(AdapterStore(h.backbone(), folder), max_wait_ms=1, **access)


def _predict(url: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", files={"image": ("x.png", h.png_bytes(), "image/png")},
                      data={"adapter": "lora_qv", "top_k": "2"}, headers=headers or {}, timeout=60)  # fmt: skip


# every endpoint that needs the token (with a token set), as (method, path)
GUARDED = [
    ("GET", "/v1/adapters"),
    ("POST", "/v1/adapters/lora_qv/load"),
    ("POST", "/v1/adapters/lora_qv/unload"),
    ("POST", "/v1/adapters/rescan"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/route"),
]


def _assert_401(res: httpx.Response, message: str) -> None:
    assert res.status_code == 401, (res.request.url, res.text)
    assert res.json() == {"error": message, "status": 401}, res.text
    assert res.headers["www-authenticate"].startswith("Bearer "), res.headers


def test_a_token_guards_every_endpoint_but_health_and_the_page(folder):
    with h.serving(_app(folder, token=TOKEN)) as url:
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok", "liveness needs no token"
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and 'id="token"' in page.text, "the page (no data) is served without one"
        missing = "this server needs a token: send the header 'Authorization: Bearer <token>'"
        _assert_401(_predict(url), missing)
        for method, path in GUARDED:
            _assert_401(httpx.request(method, f"{url}{path}", timeout=10), missing)
        wrong = "the bearer token is wrong"
        for bad in (TOKEN[:-1], TOKEN + "x", TOKEN.upper(), f"{TOKEN} {TOKEN}", "x"):
            _assert_401(_predict(url, {"Authorization": f"Bearer {bad}"}), wrong)
        _assert_401(_predict(url, {"Authorization": f"Basic {TOKEN}"}), "the Authorization header must be "
                    "'Bearer <token>'")  # fmt: skip
        assert 'error="invalid_token"' in _predict(url, {"Authorization": "Bearer nope"}).headers["www-authenticate"]
        res = _predict(url, good)
        assert res.status_code == 200 and len(res.json()["predictions"]) == 2, res.text
        res = _predict(url, {"Authorization": f"bearer {TOKEN}"})
        assert res.status_code == 200, "the scheme is case-insensitive (RFC 7235)"
        for method, path in GUARDED[:5]:
            assert httpx.request(method, f"{url}{path}", headers=good, timeout=30).status_code == 200, path
        metrics = httpx.get(f"{url}/metrics", headers=good, timeout=10).text
        assert 'vpeft_serve_requests_total{adapter="lora_qv",status="200"} 2.0' in metrics, "401s never ran"


def test_without_a_token_nothing_is_guarded(folder):
    with h.serving(_app(folder)) as url:
        for headers in ({}, {"Authorization": "Bearer whatever"}):
            assert _predict(url, headers).status_code == 200
            res = httpx.get(f"{url}/v1/adapters", headers=headers, timeout=10)
            assert res.status_code == 200 and "www-authenticate" not in res.headers


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(f"{url}/v1/predict", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization,content-type"}, timeout=10)  # fmt: skip


def _cors_headers(res: httpx.Response) -> dict:
    return {k: v for k, v in res.headers.items() if k.lower().startswith("access-control-")}


def test_cors_is_off_by_default(folder):
    with h.serving(_app(folder)) as url:
        res = _preflight(url, ALLOWED)
        assert res.status_code == 405 and _cors_headers(res) == {}, (res.status_code, res.headers)
        res = httpx.get(f"{url}/v1/adapters", headers={"Origin": ALLOWED}, timeout=10)
        assert res.status_code == 200 and _cors_headers(res) == {}, res.headers


def test_cors_origins_are_exactly_those_given(folder):
    other = "https://app.example.com:444"
    with h.serving(_app(folder, token=TOKEN, cors_origins=[ALLOWED, "http://localhost:3000"])) as url:
        res = _preflight(url, ALLOWED)
        assert res.status_code == 200, "a preflight carries no token: it is answered before the token check"
        assert res.headers["access-control-allow-origin"] == ALLOWED
        assert {"authorization", "content-type"} <= set(res.headers["access-control-allow-headers"].lower()
                                                       .replace(" ", "").split(","))  # fmt: skip
        assert "POST" in res.headers["access-control-allow-methods"]
        assert (
            _preflight(url, "http://localhost:3000").headers["access-control-allow-origin"] == "http://localhost:3000"
        )
        for origin in (other, "https://evil.example.com", "http://app.example.com"):
            res = _preflight(url, origin)
            assert res.status_code == 400 and "access-control-allow-origin" not in res.headers, (origin, res.headers)
        res = _predict(url, {"Origin": ALLOWED, "Authorization": f"Bearer {TOKEN}"})
        assert res.status_code == 200 and res.headers["access-control-allow-origin"] == ALLOWED
        res = _predict(url, {"Origin": ALLOWED})
        assert res.status_code == 401 and res.headers["access-control-allow-origin"] == ALLOWED, (
            "a page of an allowed origin can read the 401"
        )
        res = _predict(url, {"Origin": other, "Authorization": f"Bearer {TOKEN}"})
        assert res.status_code == 200 and "access-control-allow-origin" not in res.headers


def test_the_token_comes_from_the_flag_else_the_environment():
    env = {"VPEFT_SERVE_TOKEN": "from-env"}
    assert serve_token("from-flag", env) == "from-flag", "the flag wins"
    assert serve_token(None, env) == "from-env"
    assert serve_token(None, {}) is None and serve_token(None, {"VPEFT_SERVE_TOKEN": ""}) is None


@pytest.mark.parametrize(
    "access,message",
    [
        ({"token": ""}, "token '' must be a non-empty string of visible ASCII characters (no spaces)"),
        ({"token": "two words"}, "token (a value of 9 characters) must be a non-empty string"),
        ({"cors_origins": ["app.example.com"]}, "cors_origins 'app.example.com' is not an origin"),
        ({"cors_origins": ["https://a.example.com/path"]}, "cors_origins 'https://a.example.com/path' is not an"),
        ({"cors_origins": "https://a.example.com"}, "cors_origins must be a list of origins, got the string"),
    ],
)
def test_bad_access_options_are_refused(folder, access, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _app(folder, **access)


def _readme_client() -> str:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Serving (`vpeft serve`)") :]
    section = section[: section.index("\n## ")]
    [block] = re.findall(r"^```py\n(.*?)^```$", section, flags=re.S | re.M)
    return block


def test_the_readme_client_example_runs(tmp_path, monkeypatch, capsys):
    """The Serving section's httpx client (multipart and base64 JSON, the token from $VPEFT_SERVE_TOKEN, the
    adapter in the query string for a balancer) against a real server with a token; the README's ``?adapter=``
    routing parameter of a load request is ignored by the server too."""
    import shutil

    from PIL import Image

    deltas = h.make_folder(tmp_path / "src", {"lora_qv": h.SHARED["lora_qv"]}, segmentation=False)
    (tmp_path / "deltas").mkdir()
    shutil.copy(deltas / "lora_qv.safetensors", tmp_path / "deltas" / "cifar10.safetensors")
    Image.new("RGB", (40, 30), (200, 120, 30)).save(tmp_path / "cat.jpg")
    block = _readme_client()
    with h.serving(_app(tmp_path / "deltas", token=TOKEN)) as url:
        assert 'URL = "http://127.0.0.1:8000"' in block
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("VPEFT_SERVE_TOKEN", TOKEN)
        exec(compile(block.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
        res = httpx.post(f"{url}/v1/adapters/cifar10/load?pin=true&adapter=cifar10",
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)  # fmt: skip
    assert res.status_code == 200 and res.json()["pinned"] is True, res.text
    first, second = capsys.readouterr().out.strip().splitlines()
    top = eval(first)  # noqa: S307 - the example's own printed list of (class, score)
    assert len(top) == 3 and {c for c, _ in top} == {0, 1, 2} and abs(sum(s for _, s in top) - 1) < 2e-3, first
    assert second.startswith("200 {'adapter': 'cifar10', 'kind': 'classification', 'predictions': [{'index': "), second
