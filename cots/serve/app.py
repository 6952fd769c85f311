"""The application: the page, the JSON API and the indexed files, over one :class:`cots.search.Searcher`.

Searches run in Starlette's thread pool (the event loop keeps answering while the model works); the Searcher does
not change after construction, so concurrent requests share it.
"""

from __future__ import annotations

import dataclasses
import mimetypes
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from cots.retriever import UnreadableImage
from cots.search import UnsafePath
from cots.search.searcher import Hit, Searcher
from cots.serve import Limits, inputs
from cots.serve.errors import HANDLERS, ApiError

PAGE = Path(__file__).with_name("page.html")
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}
# Every response: no MIME sniffing, no referrer, not framed by other sites.
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
# The page loads nothing from elsewhere: its own inline script and style, images and JSON from this server.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class SearchApi:
    """The route handlers, bound to a Searcher and the request limits."""

    def __init__(self, searcher: Searcher, limits: Limits) -> None:
        self.searcher = searcher
        self.index = searcher.index
        self.limits = limits
        self.page_html = PAGE.read_text(encoding="utf-8")

    async def page(self, request: Request) -> Response:
        headers = {**COMMON_HEADERS, "Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}
        return Response(self.page_html, media_type="text/html; charset=utf-8", headers=headers)

    async def info(self, request: Request) -> JSONResponse:
        return _json(
            {
                "count": self.index.count,
                "model_id": self.index.model_id,
                "backend": self.searcher.backend,
                "limits": dataclasses.asdict(self.limits),
            }
        )

    async def search(self, request: Request) -> JSONResponse:
        text = inputs.caption(request.query_params, self.limits)
        k = inputs.top_k(request.query_params, self.limits)
        return await self._results({"text": text}, k, self.searcher.text, text)

    async def search_image(self, request: Request) -> JSONResponse:
        k = inputs.top_k(request.query_params, self.limits)
        name, data = await inputs.uploaded_image(request, self.limits)
        try:
            return await self._results({"image": name}, k, self.searcher.image, data)
        except UnreadableImage as bad:
            status = 413 if bad.reason == "too_large" else 400
            raise ApiError(status, f"{name} is not an image this server can read ({bad.reason})") from None

    async def similar(self, request: Request) -> JSONResponse:
        number = inputs.item_id(request.path_params["item_id"], self.index.count)
        k = inputs.top_k(request.query_params, self.limits)
        query = {"similar_to": {"id": number, "path": self.index.paths[number], "url": f"/files/{number}"}}
        return await self._results(query, k, self.searcher.neighbours, number)

    async def file(self, request: Request) -> FileResponse:
        number = inputs.item_id(request.path_params["item_id"], self.index.count)
        path = await run_in_threadpool(self._file_of, number)
        media_type = MEDIA_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
        return FileResponse(path, media_type=media_type or "application/octet-stream", headers=COMMON_HEADERS)

    def _file_of(self, number: int) -> Path:
        """The file of an item, only if it is under the indexed root and still there (404 otherwise)."""
        try:
            path = self.index.resolve(number)
        except (IndexError, UnsafePath):
            raise ApiError(404, f"item {number} is not served: its file is not under the indexed folder") from None
        if not path.is_file():
            raise ApiError(404, f"item {number} ({self.index.paths[number]}) is no longer on disk")
        return path

    async def _results(self, query: dict, k: int, search, *args) -> JSONResponse:
        started = time.perf_counter()
        hits: list[Hit] = await run_in_threadpool(search, *args, k)
        return _json(
            {
                "query": query,
                "k": k,
                "count": self.index.count,
                "model_id": self.index.model_id,
                "seconds": round(time.perf_counter() - started, 6),
                "hits": [
                    {"rank": rank, **hit.as_dict(), "url": f"/files/{hit.id}"} for rank, hit in enumerate(hits, 1)
                ],
            }
        )


def create_app(searcher: Searcher, limits: Limits | None = None, allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI application over ``searcher``.

    Args:
        limits: what a request may ask (:class:`cots.serve.Limits`).
        allowed_hosts: the Host headers answered (others get 400), e.g. the loopback names when bound to
            127.0.0.1, so that a web site cannot reach the server through a DNS name of its own; None: any.
    """
    limits = limits or Limits()
    api = SearchApi(searcher, limits)
    routes = [
        Route("/", api.page),
        Route("/api/info", api.info),
        Route("/api/search", api.search),
        Route("/api/search/image", api.search_image, methods=["POST"]),
        Route("/api/similar/{item_id}", api.similar),
        Route("/files/{item_id}", api.file),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=HANDLERS)
    return app


def _json(content: dict) -> JSONResponse:
    return JSONResponse(content, headers={**COMMON_HEADERS, "Cache-Control": "no-store"})
