"""A loopback HTTP server that behaves like a CDN, for the network-shaped benchmark (issue 25).

    python bench/cdn_server.py FILE... [--bandwidth-mbs 1.5] [--connections 2] [--latency-ms 40]
                                       [--seconds 600] [--log cdn.log]

Each file is served under its name on 127.0.0.1 only, with HTTP Range (`bytes=a-b`, `a-`, `-n`),
`--latency-ms` of delay before every response (HEAD or GET), a fixed bandwidth per connection
(`--bandwidth-mbs`, 10^6 bytes a second, a token bucket one 64 KiB chunk deep) and a link of
`--connections` times that bandwidth shared by every connection: so the fastest any client can
fetch is `--connections` connections at full speed, however many it opens. One line per request
goes to the log (time, client port, method, path, range, status, bytes sent, seconds, `done` or
`hung-up`), and the bytes served are counted. The server stops by itself after `--seconds`,
whatever its users do.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

CHUNK_BYTES = 64 * 1024


class Pacer:
    """A token bucket one chunk deep, kept as a virtual clock: `reserve(n)` says when n bytes may go."""

    def __init__(self, bytes_per_second: float) -> None:
        self.bytes_per_second = bytes_per_second
        self.free_at = 0.0
        self.lock = threading.Lock()

    def reserve(self, size: int) -> float:
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + size / self.bytes_per_second
            return self.free_at


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a `Range: bytes=…` header (the whole file without one); None when
    the range cannot be satisfied."""
    if not header or not header.startswith("bytes=") or "," in header:
        return (0, size - 1) if size else None
    first_text, _, last_text = header[6:].strip().partition("-")
    try:
        if not first_text:
            first, last = max(0, size - int(last_text)), size - 1
        else:
            first = int(first_text)
            last = min(int(last_text), size - 1) if last_text else size - 1
    except ValueError:
        return (0, size - 1) if size else None
    return (first, last) if first <= last < size else None


class CdnServer:
    """The server on 127.0.0.1 (a free port), serving from a thread until `stop` or its lifetime ends."""

    def __init__(
        self,
        bandwidth_bytes_per_second: float,
        connections: int,
        latency_seconds: float,
        lifetime_seconds: float,
        log_path: Path,
    ) -> None:
        self.files: dict[str, Path] = {}
        self.bandwidth_bytes_per_second = bandwidth_bytes_per_second
        self.link = Pacer(bandwidth_bytes_per_second * connections)
        self.latency_seconds = latency_seconds
        self.lifetime_seconds = lifetime_seconds
        self.bytes_served = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.log: TextIO = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by stop()
        self.stopped = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime_seconds, self.stop)
        self.timer.daemon = True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.pacer = Pacer(server.bandwidth_bytes_per_second)  # one per connection

            def log_message(self, *args: object) -> None:
                pass

            def handle(self) -> None:
                # A client that stops a download early resets the connection it kept open.
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    super().handle()

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                started = time.monotonic()
                time.sleep(server.latency_seconds)
                path = server.files.get(self.path.split("?")[0])
                self.status, self.sent, self.ending = 0, 0, "done"
                try:
                    if path is None:
                        self._empty(404)
                    else:
                        self._send(path, body)
                except (ConnectionResetError, BrokenPipeError):
                    # The client hung up mid-body (yt-dlp looking a URL up reads only its start).
                    self.ending = "hung-up"
                    self.close_connection = True
                server.record(self, time.monotonic() - started)

            def _empty(self, status: int) -> None:
                self.status = status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, path: Path, body: bool) -> None:
                size = path.stat().st_size
                wanted = byte_range(self.headers.get("Range"), size)
                if wanted is None:
                    self._empty(416)
                    return
                first, last = wanted
                status = self.status = 206 if self.headers.get("Range") else 200
                self.send_response(status)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(last - first + 1))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.end_headers()
                if not body:
                    return
                with open(path, "rb") as handle:
                    handle.seek(first)
                    left = last - first + 1
                    while left and not server.stopped.is_set():
                        chunk = handle.read(min(CHUNK_BYTES, left))
                        until = max(self.pacer.reserve(len(chunk)), server.link.reserve(len(chunk)))
                        time.sleep(max(0.0, until - time.monotonic()))
                        self.wfile.write(chunk)
                        self.sent += len(chunk)
                        left -= len(chunk)
                        server.count(len(chunk))

        return Handler

    def count(self, size: int) -> None:
        with self.lock:
            self.bytes_served += size

    def record(self, handler: Any, seconds: float) -> None:
        """One line per request; `hung-up` marks a response the client stopped reading part-way."""
        with self.lock:
            self.requests += 1
            if not self.log.closed:
                self.log.write(
                    f"{time.time():.3f} {handler.client_address[1]} {handler.command} {handler.path} "
                    f"{handler.headers.get('Range') or '-'} {handler.status} {handler.sent} "
                    f"{seconds:.3f} {handler.ending}\n"
                )
                self.log.flush()

    def add(self, path: Path) -> str:
        self.files["/" + path.name] = path
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{path.name}"

    def start(self) -> CdnServer:
        self.thread.start()
        self.timer.start()
        return self

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            self.log.close()

    def __enter__(self) -> CdnServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--bandwidth-mbs", type=float, default=1.5, help="per connection, 10^6 bytes/s")
    parser.add_argument("--connections", type=int, default=2, help="the link carries this many at full speed")
    parser.add_argument("--latency-ms", type=float, default=40.0)
    parser.add_argument("--seconds", type=float, default=600.0, help="the server stops by itself after this")
    parser.add_argument("--log", type=Path, default=Path("cdn.log"))
    args = parser.parse_args()
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        print(f"cdn_server: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    server = CdnServer(
        args.bandwidth_mbs * 1e6, args.connections, args.latency_ms / 1000, args.seconds, args.log
    )
    with server:
        for path in args.files:
            print(server.add(path.resolve()), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.stopped.wait()
    print(f"served {server.bytes_served} bytes in {server.requests} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
