"""Prometheus metrics for `serve`, fed by the supervisor's events (off unless an address is set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from daemon.events import (
    ClipEnded,
    Event,
    FleetSnapshot,
    FramesWritten,
    SiteChanged,
    UrlEnded,
    WorkerRestarted,
)
from daemon.ledger import UrlState


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
        for url_state in (UrlState.DONE, UrlState.SKIPPED, UrlState.FAILED, UrlState.PENDING):
            self.urls.labels(url_state.value)
        for clip_state in ("done", "failed"):
            self.clips.labels(clip_state)
        self._server, self._thread = start_http_server(int(port), addr=host, registry=r)

    def on_event(self, event: Event) -> None:
        match event:
            case UrlEnded():
                self.urls.labels(event.state.value).inc()
                self.download_seconds.inc(event.download_seconds or 0.0)
                self.process_seconds.inc(event.process_seconds or 0.0)
            case ClipEnded(error=None):
                self.clips.labels("done").inc()
                self.bytes.inc(event.bytes)
            case ClipEnded():
                self.clips.labels("failed").inc()
            case FramesWritten(count=count):
                self.frames.inc(count)
            case WorkerRestarted():
                self.restarts.inc()
            case SiteChanged(blocked=True):
                self.site_blocks.inc()

    def observe(self, fleet: FleetSnapshot) -> None:
        """Gauges that describe the present rather than count events."""
        self.queued.set(fleet.queued)
        self.running.set(fleet.running)
        self.paused.set(1 if fleet.disk_paused else 0)
        self.sites_paused.set(len(fleet.sites_paused))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
