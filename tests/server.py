"""A loopback HTTP server for tests: serves files, and misbehaves on purpose when asked to."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Route:
    body: bytes
    content_type: str = "video/mp4"
    status: int = 200  # a fixed error status (404, 403, …) instead of the body
    fail_first: int = 0  # answer the first N GETs with `fail_status`
    fail_status: int = 503
    drop_gets: tuple[int, ...] = ()  # cut the connection a third of the way into these GETs (1-based)
    stall_gets: tuple[int, ...] = ()  # send half the body of these GETs, then nothing until shutdown
    gets: int = 0
    requests: list[str] = field(default_factory=list)


class MediaServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                # yt-dlp reads only the start of a response when it looks a URL up, then hangs up.
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?")[0]
                with server.lock:
                    route = server.routes.get(path)
                    if route is not None:
                        route.requests.append(self.command)
                        if not head:
                            route.gets += 1
                        attempt = route.gets
                if route is None or route.status != 200:
                    self._status(route.status if route else 404)
                    return
                if not head and attempt <= route.fail_first:
                    self._status(route.fail_status)
                    return
                body = route.body
                start = 0
                range_header = self.headers.get("Range")
                if range_header and range_header.startswith("bytes="):
                    first = range_header[6:].split("-")[0]
                    start = int(first) if first else 0
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if head:
                    return
                if attempt in route.stall_gets:
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    server.closing.wait(60)  # bounded: the server never outlives its test by long
                    self.close_connection = True
                    return
                if attempt in route.drop_gets:
                    self.wfile.write(body[start : start + (len(body) - start) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body[start:])

            def _status(self, status: int) -> None:
                message = b"no"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(message)))
                self.end_headers()
                self.wfile.write(message)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MediaServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, name: str, body: bytes | Path, **behaviour: object) -> str:
        data = body.read_bytes() if isinstance(body, Path) else body
        content_type = "video/webm" if name.endswith(".webm") else "video/mp4"
        self.routes["/" + name] = Route(body=data, content_type=content_type, **behaviour)  # type: ignore[arg-type]
        return f"{self.base}/{name}"

    def gets(self, name: str) -> int:
        route = self.routes.get("/" + name)
        return route.gets if route else 0
