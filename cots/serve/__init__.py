"""``cots-serve INDEX``: a search page over an index (``cots-index``), and its JSON API.

    GET  /                       the page (page.html: a text box, the top-k thumbnails with scores, "more like this")
    GET  /api/info               {count, model_id, backend, limits}
    GET  /api/search?q=&k=       the k images that best match the caption q
    POST /api/search/image?k=    the k images nearest to an uploaded image (multipart/form-data, file field "image")
    GET  /api/similar/{id}?k=    the k images nearest to item id ("more like this"), the item itself left out
    GET  /files/{id}             the indexed file of item id, as stored (no server-side thumbnail)

A result is ``{query, k, count, model_id, seconds, hits: [{rank, id, path, score, url}]}``; an error is
``{error, status}`` with a 4xx status that names what was wrong. Files are reached by item id only: no path from a
request reaches the file system, and a file whose path leads outside the indexed root (``..``, absolute, a symlink)
is not served (:meth:`cots.search.index.SearchIndex.resolve`).

Only this module is imported with the package (no torch, no starlette); :func:`cots.serve.app.create_app` builds the
application, :mod:`cots.serve.cli` runs it (``pip install -e .[serve]``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What a request may ask. Past them the API answers 4xx with a message, before any model work."""

    max_query_chars: int = 1000  # characters of a caption (422 past it)
    max_k: int = 100  # results per query (k outside 1..max_k: 422)
    default_k: int = 12
    max_upload_bytes: int = 10 * 2**20  # an uploaded image (413 past it)
