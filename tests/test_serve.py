"""``cots-serve`` at the HTTP level: Starlette's TestClient over an index of the test folder, built with the tiny
run's model.

The search, image and "more like this" results equal the Searcher's; thumbnails are the indexed files themselves;
files are reached by item id only (traversal, encoded or absolute paths, bad ids and symlinks leading out: 404); bad
queries and uploads get a 4xx that says why, never a 500; searches leave the event loop free; the command prints
its URL, binds to localhost by default and warns on 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from image_files import IMAGES, make_folder, write_image
from starlette.testclient import TestClient

from cots.search.build import build_index
from cots.search.searcher import Searcher
from cots.serve import Limits
from cots.serve import cli as serve_cli
from cots.serve.app import create_app

MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}


@pytest.fixture(scope="module")
def searcher(model, tmp_path_factory) -> Searcher:
    root = make_folder(tmp_path_factory.mktemp("serve") / "photos")
    build_index(model, root, root.parent / "index")
    return Searcher(root.parent / "index", model=model)


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher), raise_server_exceptions=False) as client:
        yield client


def _error(response: httpx.Response, status: int, *words: str) -> str:
    """The API's message, after checking the status, the JSON shape and that it names ``words``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and isinstance(body["error"], str)
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


def _raw_get(app, raw_path: str, host: bytes = b"testserver") -> tuple[int, bytes]:
    """GET a path exactly as written (no client normalises ``..`` away), as uvicorn hands it to the app:
    ``path`` percent-decoded, ``raw_path`` as sent."""
    path, _, query = raw_path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", host)],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# -- the page and the results ----------------------------------------------------------------------------
def test_the_page_loads_nothing_from_elsewhere(client, searcher):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="query"' in page.text and 'id="results"' in page.text and "More like this" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "img-src 'self' blob:" in policy
    info = client.get("/api/info").json()
    assert info["count"] == 7 and info["model_id"] == searcher.index.model_id
    assert info["limits"] == {"max_query_chars": 1000, "max_k": 100, "default_k": 12, "max_upload_bytes": 10 * 2**20}


def test_a_text_search_returns_the_searchers_hits_and_their_files(client, searcher):
    response = client.get("/api/search", params={"q": "a red circle", "k": 3})
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    result = response.json()
    assert result["query"] == {"text": "a red circle"} and result["k"] == 3 and result["count"] == 7
    expected = searcher.text("a red circle", k=3)
    assert [(h["id"], h["path"]) for h in result["hits"]] == [(h.id, h.path) for h in expected]
    assert [h["score"] for h in result["hits"]] == pytest.approx([h.score for h in expected], abs=1e-6)
    assert [h["rank"] for h in result["hits"]] == [1, 2, 3]

    everything = client.get("/api/search", params={"q": "anything"}).json()["hits"]  # default k=12, 7 indexed
    assert sorted(h["path"] for h in everything) == sorted(IMAGES)
    for hit in everything:  # each thumbnail is the indexed file itself, with its image type
        assert hit["url"] == f"/files/{hit['id']}"
        file = client.get(hit["url"])
        assert file.status_code == 200, hit
        assert file.content == (searcher.index.root / hit["path"]).read_bytes()
        assert file.headers["content-type"] == MEDIA_TYPES[Path(hit["path"]).suffix.lower()]
        assert file.headers["x-content-type-options"] == "nosniff"


def test_more_like_this_and_an_uploaded_image(client, searcher, tmp_path):
    item = searcher.index.id_of("a/red.png")
    result = client.get(f"/api/similar/{item}", params={"k": 3}).json()
    assert result["query"] == {"similar_to": {"id": item, "path": "a/red.png", "url": f"/files/{item}"}}
    assert [h["id"] for h in result["hits"]] == [h.id for h in searcher.neighbours(item, k=3)]
    assert item not in [h["id"] for h in result["hits"]]

    upload = (searcher.index.root / "rgba.png").read_bytes()
    response = client.post("/api/search/image", params={"k": 2}, files={"image": ("mine.png", upload, "image/png")})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["query"] == {"image": "mine.png"} and result["hits"][0]["path"] == "rgba.png"
    assert [h["id"] for h in result["hits"]] == [h.id for h in searcher.image(upload, k=2)]


# -- 4xx, never 500 --------------------------------------------------------------------------------------
def test_empty_long_and_malformed_queries_get_a_clear_4xx(client):
    for params in ({}, {"q": ""}, {"q": "   \t "}):
        _error(client.get("/api/search", params=params), 400, "empty")
    _error(client.get("/api/search", params={"q": "x" * 10_000}), 422, "10,000 characters", "1,000")
    _error(client.get("/api/search", params={"q": "é" * 1001}), 422, "1,001 characters")
    assert client.get("/api/search", params={"q": "é" * 1000, "k": 1}).status_code == 200  # the limit itself
    for k in ("0", "-1", "101", "abc", "1e3", "2.5", " 3", "9" * 40, ""):
        _error(client.get("/api/search", params={"q": "red", "k": k}), 422, "k must be an integer from 1 to 100")
        _error(client.get("/api/similar/0", params={"k": k}), 422, "k must be")
    long_k = _error(client.get("/api/search", params={"q": "red", "k": "7" * 5000}), 422)
    assert len(long_k) < 200  # a message never echoes a long parameter whole
    assert client.get("/api/search", params={"q": "red", "k": 100}).status_code == 200


def test_a_broken_or_odd_upload_gets_a_4xx_that_names_the_reason(client, searcher, tmp_path):
    good = (searcher.index.root / "a/red.png").read_bytes()

    def post(**kwargs) -> httpx.Response:
        return client.post("/api/search/image", **kwargs)

    _error(post(files={"image": ("x.png", b"not an image", "image/png")}), 400, "x.png", "undecodable")
    _error(post(files={"image": ("cut.png", good[:60], "image/png")}), 400, "cut.png", "undecodable")
    _error(post(files={"image": ("empty.png", b"", "image/png")}), 400, "empty")
    _error(post(files={"other": ("x.png", good, "image/png")}), 400, "no file field named 'image'")
    _error(post(data={"image": "text"}, files={"x": ("x", b"1")}), 400, "no file field named 'image'")
    _error(post(data={"image": "a form, not multipart"}), 415, "multipart/form-data")
    _error(post(content=good, headers={"content-type": "image/png"}), 415, "multipart/form-data")
    _error(post(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}), 400)
    _error(post(content=b"", headers={"content-type": "multipart/form-data"}), 400)
    _error(post(files={"image": ("x.png", good, "image/png")}, params={"k": "0"}), 422, "k must be")
    _error(client.get("/api/search/image"), 405)

    _error(post(files={"image": ("bomb.png", _png_claiming(10_000, 10_000), "image/png")}), 413, "too_large")

    small = Limits(max_upload_bytes=1000)
    with TestClient(create_app(searcher, small), raise_server_exceptions=False) as limited:
        assert len(good) < 1000
        assert limited.post("/api/search/image", files={"image": ("ok.png", good, "image/png")}).status_code == 200
        padded = good + b"\0" * 2000  # the file field alone passes the limit (the body is within its overhead)
        _error(limited.post("/api/search/image", files={"image": ("big.png", padded)}), 413, "larger than 1,000 bytes")
        huge = b"\0" * (small.max_upload_bytes + 70_000)  # the body passes the limit: refused by its Content-Length
        _error(limited.post("/api/search/image", files={"image": ("huge.png", huge)}), 413, "larger than")
        chunked = (b"\0" * 10_000 for _ in range(10))  # no Content-Length: refused as the body arrives
        multipart = {"content-type": "multipart/form-data; boundary=x"}
        _error(limited.post("/api/search/image", content=chunked, headers=multipart), 413, "larger than")


def _png_claiming(width: int, height: int) -> bytes:
    """A 69-byte PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


# -- files by id only --------------------------------------------------------------------------------------
TRAVERSALS = [
    "/files/..",
    "/files/%2e%2e",
    "/files/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/files/..%2f..%2fetc%2fpasswd",
    "/files/../../etc/passwd",
    "/files/0/../../etc/passwd",
    "/files/%2fetc%2fpasswd",
    "/files//etc/passwd",
    "/files/C:%5Cwindows%5Cwin.ini",
    "/files/a/red.png",
    "/files/a%2fred.png",
    "/a/red.png",
    "/photos/a/red.png",
    "/../photos/a/red.png",
    "/etc/passwd",
    "/files/",
    "/files/-1",
    "/files/7",
    "/files/1.0",
    "/files/+1",
    "/files/0x1",
    "/files/1%00",
    "/files/%201",
    "/files/" + "9" * 19,
    "/files/" + "9" * 400,
    "/api/similar/-1",
    "/api/similar/7",
    "/api/similar/..%2f0",
    "/api/similar/%2e%2e",
    "/api/similar/" + "1" * 30,
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_anything_but_an_indexed_id_is_not_found(client, path):
    status, body = _raw_get(client.app, path)
    assert status == 404, (path, body)
    assert b"root:" not in body and b"\x89PNG" not in body


def test_a_symlink_leading_out_of_the_root_is_not_served(folder, model, tmp_path):
    secret = tmp_path / "secret.png"
    write_image(secret, (1, 1, 1))
    inside = folder / "a/also_red.png"
    inside.symlink_to(folder / "a/red.png")  # a link that stays under the root is served
    build_index(model, folder, tmp_path / "index")
    searcher = Searcher(tmp_path / "index", model=model)
    with TestClient(create_app(searcher), raise_server_exceptions=False) as client:
        red, linked = searcher.index.id_of("a/red.png"), searcher.index.id_of("a/also_red.png")
        assert client.get(f"/files/{linked}").content == (folder / "a/red.png").read_bytes()
        (folder / "a/red.png").unlink()
        (folder / "a/red.png").symlink_to(secret)  # replaced by a link leading out after indexing
        for item in (red, linked):
            _error(client.get(f"/files/{item}"), 404, "not under the indexed folder")
        (folder / "a/red.png").unlink()  # gone: 404, not a 500 from a missing file
        _error(client.get(f"/files/{red}"), 404)
        assert client.get(f"/files/{searcher.index.id_of('rgba.png')}").status_code == 200


def test_only_loopback_host_names_when_asked(searcher):
    app = create_app(searcher, allowed_hosts=serve_cli.LOOPBACK_NAMES)
    for host in (b"127.0.0.1:8000", b"localhost:8000", b"[::1]:8000", b"localhost"):
        assert _raw_get(app, "/api/info", host=host)[0] == 200, host
    for host in (b"attacker.example:8000", b"127.0.0.1.attacker.example", b""):
        assert _raw_get(app, "/api/info", host=host)[0] == 400, host


# -- the event loop stays free ----------------------------------------------------------------------------
def test_a_slow_search_does_not_block_other_requests(searcher, monkeypatch):
    def slow(query, k):
        time.sleep(1.0)  # blocks its thread: the event loop must not be that thread
        return []

    monkeypatch.setattr(searcher, "text", slow)
    app = create_app(searcher)

    async def both():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            search = asyncio.create_task(client.get("/api/search", params={"q": "red"}))
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            info = await client.get("/api/info")
            waited = time.perf_counter() - started
            assert info.status_code == 200 and not search.done()
            assert (await search).status_code == 200
            return waited

    assert asyncio.run(both()) < 0.5


# -- the command ------------------------------------------------------------------------------------------
def test_import_cots_serve_loads_neither_torch_nor_starlette():
    code = "import sys, cots.serve, cots.serve.cli; print('torch' in sys.modules, 'starlette' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cots_serve_prints_its_url_and_warns_on_every_interface(searcher, monkeypatch, capsys, tmp_path):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: served.append((server.config.app, sockets)))
    folder = str(searcher.index.folder)

    assert serve_cli.main([folder, "--port", "0"]) == 0
    out, err = capsys.readouterr()
    (app, (sock,)) = served.pop()
    port = sock.getsockname()[1]
    assert (
        out.strip()
        == f"cots-serve: 7 images of {searcher.index.root} ({searcher.index.model_id}) at http://127.0.0.1:{port}/"
    )
    assert err == "" and sock.getsockname()[0] == "127.0.0.1"
    assert _raw_get(app, "/api/info", host=b"attacker.example")[0] == 400  # loopback: loopback names only
    sock.close()

    assert serve_cli.main([folder, "--host", "0.0.0.0", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    (app, (sock,)) = served.pop()
    assert f"at http://0.0.0.0:{sock.getsockname()[1]}/" in out
    assert "warning: bound to 0.0.0.0: every machine that reaches this one can search the index" in err
    assert _raw_get(app, "/api/info", host=b"some-name.example")[0] == 200
    sock.close()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert serve_cli.main([folder, "--port", str(busy.getsockname()[1])]) == 2
    assert "cots-serve: error: cannot listen on 127.0.0.1:" in capsys.readouterr().err
    assert serve_cli.main([str(tmp_path / "nothing")]) == 2
    assert "no search index at" in capsys.readouterr().err
    assert served == []
