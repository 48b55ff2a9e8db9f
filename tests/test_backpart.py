"""A spare connection for the back part of a download: when no URL waits and a worker idles, the
download in flight fetches its back half on a second connection, and the file is byte for byte the
one a single connection gives, with no byte fetched twice beyond a little overlap."""

from __future__ import annotations

import os
import time
from pathlib import Path

from daemon.arrival import BackgroundDownload

from conftest import FAST_CONFIG, run_cli
from media import decoded_indices, make_video, settings
from server import MediaServer

# Bytes a download may fetch beyond the file's size when split: what the front connection had in
# flight when it stopped.
OVERLAP_BYTES = 1024 * 1024


def download_settings(min_mb: float = 0.5, **overrides: object) -> tuple[object, object]:
    config = settings(
        **{
            "download.spare_connection_min_mb": min_mb,
            "download.backoff_initial_seconds": 0.1,
            **overrides,
        }
    )
    return config.download, config.output


def offered_once_started(download: BackgroundDownload, after_bytes: int, seconds: float = 30) -> None:
    """Offers the spare connection once `after_bytes` of the file are in."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        left = download.bytes_left()
        total = download.arrival.total_bytes
        if left is not None and total is not None and total - left >= after_bytes:
            download.offer_connection()
            return
        time.sleep(0.02)
    raise AssertionError("the download never got going")


def downloaded_with_an_offer(url: str, folder: Path, body: bytes) -> None:
    """Downloads `url` into `folder`, offering a spare connection once it is under way; the file
    must come out whole, the same bytes, with nothing left beside it."""
    download_config, output = download_settings()
    download = BackgroundDownload(url, folder, download_config, output).start()  # type: ignore[arg-type]
    offered_once_started(download, after_bytes=300_000)
    download.arrival.wait_for_end()
    assert download.arrival.error is None
    assert download.arrival.final_path is not None
    assert download.arrival.final_path.read_bytes() == body
    assert sorted(p.name for p in folder.iterdir()) == [url.rsplit("/", 1)[1]]  # no side files left


def test_a_spare_connection_fetches_the_rest_in_chunks_in_order_and_the_file_is_the_same(
    server: MediaServer, tmp_path: Path
) -> None:
    body = os.urandom(12_000_000)  # three 4 MiB chunks after the offer
    url = server.add("big.mp4", body, bytes_per_second=3_000_000)  # 4 s on one connection
    downloaded_with_an_offer(url, tmp_path / "dl", body)
    route = server.routes["/big.mp4"]
    # After yt-dlp's own request: ranges that tile the rest of the file, the last to its end.
    spans = sorted(tuple(int(n) for n in r[6:].split("-")) for r in route.ranges)
    assert len(spans) >= 3 and spans[-1][1] == len(body) - 1
    assert all(after[0] == before[1] + 1 for before, after in zip(spans, spans[1:], strict=False))
    assert 300_000 <= spans[0][0] < 4_000_000
    assert route.served_bytes <= len(body) + OVERLAP_BYTES  # not fetched twice


def test_a_second_connection_that_breaks_leaves_the_download_whole(
    server: MediaServer, tmp_path: Path
) -> None:
    body = os.urandom(3_000_000)
    # GET 1 is yt-dlp's look-up, 2 the download, 3 the back part: it breaks a third of the way.
    url = server.add("big.mp4", body, bytes_per_second=600_000, drop_gets=(3,))
    downloaded_with_an_offer(url, tmp_path / "dl", body)
    assert server.routes["/big.mp4"].gets >= 3


def test_no_spare_connection_under_a_rate_limit_or_when_turned_off(
    server: MediaServer, tmp_path: Path
) -> None:
    body = os.urandom(1_200_000)
    for name, overrides in (
        ("limited.mp4", {"download.rate_limit": "5M"}),
        ("off.mp4", {"download.spare_connection_min_mb": 0.0}),
    ):
        url = server.add(name, body, bytes_per_second=600_000)
        download_config, output = download_settings(**{"download.spare_connection_min_mb": 0.5, **overrides})
        download = BackgroundDownload(url, tmp_path / name, download_config, output).start()  # type: ignore[arg-type]
        offered_once_started(download, after_bytes=100_000)
        download.arrival.wait_for_end()
        assert download.arrival.error is None
        assert server.routes["/" + name].ranges == []  # one connection, no range asked for


def test_a_run_lends_an_idle_workers_connection_to_the_download_still_running(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    small = make_video(workspace["media"] / "a.mp4", frames=60, index_first=True)
    big = make_video(workspace["media"] / "b.mp4", frames=900, width=320, height=180, index_first=True)
    size = big.stat().st_size
    server.add("a.mp4", small)
    # About 8 s for b on one connection; a is there at once, and its worker then idles.
    url_b = server.add("b.mp4", big, bytes_per_second=size / 8)
    (workspace["clips"] / "a.txt").write_text("0 30\n")
    clips_b = ((30, 60), (400, 430), (840, 870))
    (workspace["clips"] / "b.txt").write_text("".join(f"{s} {e}\n" for s, e in clips_b))
    workspace["urls"].write_text(f"{server.base}/a.mp4\n{url_b}\n")
    min_mb = size / 10 / 1024 / 1024
    workspace["config"].write_text(
        FAST_CONFIG.replace(
            "[download]\n",
            f"[download]\nspare_connection_min_mb = {min_mb:.3f}\nextra_options = {{ buffersize = 8192 }}\n",
        )
    )
    done = run_cli(workspace, "--workers", "2")
    assert done.returncode == 0, done.stderr
    for start, end in clips_b:
        path = workspace["out"] / "b" / f"b_{start:07d}_{end:07d}.hevc"
        assert decoded_indices(path) == list(range(start, end))
    logs = workspace["out"] / "logs"
    assert "on a second connection" in (logs / "supervisor.log").read_text()
    worker_logs = "".join(path.read_text() for path in logs.glob("worker-*.log"))
    assert "a spare connection joins the download" in worker_logs
    route = server.routes["/b.mp4"]
    assert any(r.endswith(f"-{size - 1}") for r in route.ranges)
    assert route.served_bytes <= size + OVERLAP_BYTES
    assert not list(workspace["temp"].glob("*/worker-*/*"))
