"""A loopback HTTP server for tests: serves files, and misbehaves on purpose when asked to."""

from __future__ import annotations

import contextlib
import threading
import time
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
    fail_gets: tuple[int, ...] = ()  # answer these GETs (1-based) with `fail_status` too
    drop_gets: tuple[int, ...] = ()  # cut the connection a third of the way into these GETs (1-based)
    stall_gets: tuple[int, ...] = ()  # send half the body of these GETs, then nothing until shutdown
    delay_seconds: float = 0.0  # wait this long before the body of every GET (a slow download)
    bytes_per_second: float = 0.0  # send bodies at this pace (0: at once)
    served_bytes: int = 0  # body bytes sent, over every GET
    gets: int = 0
    requests: list[str] = field(default_factory=list)
    ranges: list[str] = field(default_factory=list)  # the Range header of every GET that had one


BOT_PAGE = (
    b"<html><body>Sign in to confirm you\xe2\x80\x99re not a bot. This helps protect our community."
    b"</body></html>"
)


@dataclass
class Block:
    """The whole site refuses every request for a while, as a video site does a bulk downloader."""

    mode: str  # "429", "403" or "bot" (a 200 HTML page with the bot check)
    until: float  # time.monotonic()
    retry_after: str | None = None  # the Retry-After header of a 429


@dataclass(frozen=True)
class Hit:
    at: float  # time.monotonic()
    path: str
    status: int  # what was answered; 200 for a bot page too
    blocked: bool


class MediaServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.block: Block | None = None
        self.hits: list[Hit] = []  # every request, in order
        self.lock = threading.Lock()
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle(self) -> None:
                # A client that stops a download early resets the connection it kept open.
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    super().handle()

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                # yt-dlp reads only the start of a response when it looks a URL up, then hangs up.
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?")[0]
                block = server.block
                if block is not None and time.monotonic() < block.until:
                    self._blocked(block, path)
                    return
                with server.lock:
                    route = server.routes.get(path)
                    if route is not None:
                        route.requests.append(self.command)
                        if not head:
                            route.gets += 1
                        attempt = route.gets
                if route is None or route.status != 200:
                    server._hit(path, route.status if route else 404)
                    self._status(route.status if route else 404)
                    return
                if not head and (attempt <= route.fail_first or attempt in route.fail_gets):
                    server._hit(path, route.fail_status)
                    self._status(route.fail_status)
                    return
                server._hit(path, 200)
                body = route.body
                start, size = 0, len(body)
                range_header = self.headers.get("Range")
                if range_header and range_header.startswith("bytes="):
                    if not head:
                        with server.lock:
                            route.ranges.append(range_header)
                    first, _, last = range_header[6:].partition("-")
                    start = int(first) if first else 0
                    if last:
                        body = body[: int(last) + 1]
                if start or len(body) < size:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if head:
                    return
                if route.delay_seconds:
                    server.closing.wait(route.delay_seconds)
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
                if not route.bytes_per_second:
                    self.wfile.write(body[start:])
                    with server.lock:
                        route.served_bytes += len(body) - start
                    return
                chunk = 16 * 1024
                for offset in range(start, len(body), chunk):
                    if server.closing.is_set():
                        return
                    self.wfile.write(body[offset : offset + chunk])
                    with server.lock:
                        route.served_bytes += len(body[offset : offset + chunk])
                    time.sleep(chunk / route.bytes_per_second)

            def _status(self, status: int, headers: dict[str, str] | None = None) -> None:
                message = b"no"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(message)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(message)

            def _blocked(self, block: Block, path: str) -> None:
                if block.mode == "bot":
                    server._hit(path, 200, blocked=True)
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(BOT_PAGE)))
                    self.end_headers()
                    self.wfile.write(BOT_PAGE)
                    return
                status = int(block.mode)
                server._hit(path, status, blocked=True)
                headers = {"Retry-After": block.retry_after} if block.retry_after else {}
                self._status(status, headers)

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

    def _hit(self, path: str, status: int, blocked: bool = False) -> None:
        with self.lock:
            self.hits.append(Hit(time.monotonic(), path, status, blocked))

    def block_for(self, mode: str, seconds: float, retry_after: str | None = None) -> float:
        """Every request is refused in `mode` from now for `seconds`; returns when that began."""
        began = time.monotonic()
        self.block = Block(mode, began + seconds, retry_after)
        return began

    def add(self, name: str, body: bytes | Path, **behaviour: object) -> str:
        data = body.read_bytes() if isinstance(body, Path) else body
        content_type = "video/webm" if name.endswith(".webm") else "video/mp4"
        self.routes["/" + name] = Route(body=data, content_type=content_type, **behaviour)  # type: ignore[arg-type]
        return f"{self.base}/{name}"

    def gets(self, name: str) -> int:
        route = self.routes.get("/" + name)
        return route.gets if route else 0
