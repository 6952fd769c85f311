"""``cots-serve INDEX [--host 127.0.0.1] [--port 8000]``: the search page over an index, until Ctrl-C.

Prints the URL it serves (with ``--port 0``, the port the system chose). Binds to 127.0.0.1 by default and then
answers only requests addressed to a loopback name (a web page elsewhere cannot reach it through a DNS name of its
own); another host is served as asked, with a warning for 0.0.0.0 / ``::``. Arguments are checked before torch is
imported; errors go to stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from cots.search import INDEX_FILE

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]"]
EVERY_INTERFACE = ("0.0.0.0", "::", "")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cots-serve", description="Serve a search page over an index (cots-index): text, image, more like this."
    )
    parser.add_argument("index", type=Path, help="the index folder")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="the port (default 8000; 0: any free port)")
    parser.add_argument("--model", type=Path, help="the model (default: the one the index records)")
    parser.add_argument("--backend", choices=("exact", "faiss"), default="exact", help="exact (default) or faiss")
    parser.add_argument("--device", default="cpu", help="where the towers run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not (args.index / INDEX_FILE).is_file():
        return _error(f"no search index at {args.index} (build one with cots-index)")
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        return _error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    try:
        import uvicorn  # the serve extra, and torch with the Searcher, only once the arguments are good

        from cots.checkpoints import CheckpointError
        from cots.export import ExportError
        from cots.search import SearchError
        from cots.search.searcher import Searcher
        from cots.serve.app import create_app
    except ImportError as err:
        sock.close()
        return _error(f"{err.name or err} is missing: pip install -e .[serve]")
    try:
        searcher = Searcher(args.index, model=args.model, backend=args.backend, device=args.device)
    except (SearchError, CheckpointError, ExportError, FileNotFoundError) as err:
        sock.close()
        return _error(str(err))
    loopback = _is_loopback(args.host)
    app = create_app(searcher, allowed_hosts=LOOPBACK_NAMES if loopback else None)
    index = searcher.index
    print(f"cots-serve: {index.count} images of {index.root} ({index.model_id}) at {url(sock)}", flush=True)
    if args.host in EVERY_INTERFACE:
        print(
            f"cots-serve: warning: bound to {args.host or 'every interface'}: every machine that reaches this one "
            "can search the index and read its images",
            file=sys.stderr,
            flush=True,
        )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv4 or IPv6, as the address says), bound before the model loads, so
    that a port in use is reported at once and ``--port 0`` gets a real port to print."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _error(message: str) -> int:
    print(f"cots-serve: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
