"""What a request carries, checked against :class:`cots.serve.Limits`: a caption, k, an item id, an uploaded image.

Each function returns the value or raises :class:`ApiError` with the status and a message for the user; none of
them touches the model or the file system.
"""

from __future__ import annotations

import re

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from cots.serve import Limits
from cots.serve.errors import ApiError

FORM_OVERHEAD = 64 * 1024  # bytes of a multipart body beyond the file: boundaries, part headers, small fields
DIGITS = re.compile(r"[0-9]{1,19}")  # an id or k as written in a URL: no sign, no spaces, no exponent


def caption(params, limits: Limits) -> str:
    """The ``q`` parameter: 400 when missing or blank, 422 past ``max_query_chars`` characters."""
    text = params.get("q", "")
    if not text.strip():
        raise ApiError(400, "the query is empty: type a caption, e.g. 'a red heart'")
    if len(text) > limits.max_query_chars:
        raise ApiError(422, f"the query has {len(text):,} characters; at most {limits.max_query_chars:,} are allowed")
    return text


def top_k(params, limits: Limits) -> int:
    """The ``k`` parameter (default ``default_k``): an integer from 1 to ``max_k``, else 422."""
    raw = params.get("k")
    if raw is None:
        return limits.default_k
    if not DIGITS.fullmatch(raw) or not 1 <= int(raw) <= limits.max_k:
        raise ApiError(422, f"k must be an integer from 1 to {limits.max_k}, got {_shown(raw)}")
    return int(raw)


def item_id(raw: str, count: int) -> int:
    """An item id from a URL path: 404 unless it is a plain decimal in ``0 .. count - 1``."""
    if not DIGITS.fullmatch(raw) or int(raw) >= count:
        raise ApiError(404, f"no item {_shown(raw)} in this index (ids 0 to {count - 1})")
    return int(raw)


async def uploaded_image(request: Request, limits: Limits) -> tuple[str, bytes]:
    """The file name (cut to 200 characters) and the bytes of the file field ``image`` of a multipart/form-data
    request.

    415: another content type; 413: a body past ``max_upload_bytes`` (counted as it arrives, whatever the
    Content-Length says); 400: a malformed form, no ``image`` file, or an empty one.
    """
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise ApiError(415, "send the image as multipart/form-data with a file field named 'image'")
    body = await _body(request, limits)
    try:
        form = await Request(request.scope, _replay(body)).form(max_files=1, max_fields=8)
    except MultiPartException as err:
        raise ApiError(400, f"the upload is not a readable form: {err}") from None
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the form has no file field named 'image'")
        name, data = (upload.filename or "upload")[:200], await upload.read()
    finally:
        await form.close()
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, _too_large(limits))
    return name, data


async def _body(request: Request, limits: Limits) -> bytes:
    max_bytes = limits.max_upload_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, _too_large(limits))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, _too_large(limits))
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(body: bytes):
    """An ASGI ``receive`` that hands over a body already read, so that Starlette's form parser can read it."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _too_large(limits: Limits) -> str:
    size = limits.max_upload_bytes
    return (
        f"the upload is larger than {size / 2**20:g} MiB"
        if size >= 2**20
        else f"the upload is larger than {size:,} bytes"
    )


def _shown(raw: str) -> str:
    """A value echoed in a message, cut short (a message never repeats a 10,000-character parameter)."""
    return repr(raw if len(raw) <= 24 else raw[:24] + "...")
