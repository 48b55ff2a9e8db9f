"""Prometheus metrics for `serve`, fed by the supervisor's events (off unless an address is set)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

URL_STATES = ("done", "skipped", "failed", "pending")


class Metrics:
    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.registry = CollectorRegistry()
        r = self.registry
        self.urls = Counter("dap_urls_total", "URLs that ended, by state", ["state"], registry=r)
        self.clips = Counter("dap_clips_total", "Clips that ended, by state", ["state"], registry=r)
        self.frames = Counter("dap_frames_written_total", "Frames encoded", registry=r)
        self.bytes = Counter("dap_bytes_written_total", "Bytes of finished clip files", registry=r)
        self.download_seconds = Counter(
            "dap_download_seconds_total", "Time spent downloading finished URLs", registry=r
        )
        self.process_seconds = Counter(
            "dap_process_seconds_total", "Time spent decoding, processing and encoding", registry=r
        )
        self.restarts = Counter("dap_worker_restarts_total", "Workers started again after dying", registry=r)
        self.queued = Gauge("dap_urls_queued", "URLs waiting for a worker", registry=r)
        self.running = Gauge("dap_urls_running", "URLs a worker is on now", registry=r)
        self.paused = Gauge("dap_downloads_paused", "1 while downloads wait for free disk space", registry=r)
        self.sites_paused = Gauge("dap_sites_paused", "Sites paused: they block us", registry=r)
        self.site_blocks = Counter("dap_site_blocks_total", "Times a site started blocking us", registry=r)
        for state in URL_STATES:
            self.urls.labels(state)
        for state in ("done", "failed"):
            self.clips.labels(state)
        self._server, self._thread = start_http_server(int(port), addr=host, registry=r)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "url":
            self.urls.labels(data["state"]).inc()
            self.download_seconds.inc(data.get("download_seconds") or 0.0)
            self.process_seconds.inc(data.get("process_seconds") or 0.0)
        elif kind == "clip":
            if data.get("error"):
                self.clips.labels("failed").inc()
            else:
                self.clips.labels("done").inc()
                self.bytes.inc(data.get("bytes") or 0)
        elif kind == "frames":
            self.frames.inc(data["count"])
        elif kind == "restart":
            self.restarts.inc()
        elif kind == "site" and data.get("state") == "blocked":
            self.site_blocks.inc()

    def observe(self, supervisor: Any) -> None:
        """Gauges that describe the present rather than count events."""
        self.queued.set(len(supervisor.queue))
        self.running.set(sum(1 for h in supervisor.workers.values() if h.task is not None))
        self.paused.set(1 if supervisor.disk.reason else 0)
        self.sites_paused.set(len(supervisor.sites.paused()))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
