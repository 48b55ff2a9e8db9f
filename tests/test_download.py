"""Real yt-dlp against a loopback server that fails on purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.download import DownloadFailure, download

from media import make_video
from server import MediaServer

SETTINGS = load_settings(
    None,
    {
        "download.backoff_initial_seconds": 0.05,
        "download.backoff_max_seconds": 0.2,
        "download.rate_limited_backoff_seconds": 0.3,
    },
)


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return make_video(tmp_path / "v.mp4", frames=30)


def fetch(url: str, folder: Path, retries: list[tuple[str, int, float]] | None = None) -> Path:
    def on_retry(failure: DownloadFailure, attempt: int, delay: float) -> None:
        if retries is not None:
            retries.append((failure.kind, attempt, delay))

    return download(url, folder, SETTINGS.download, SETTINGS.output, on_retry)


def test_a_file_url_downloads_whole(server: MediaServer, video: Path, tmp_path: Path) -> None:
    path = fetch(server.add("clip.mp4", video), tmp_path / "dl")
    assert path.name == "clip.mp4" and path.read_bytes() == video.read_bytes()


@pytest.mark.parametrize("status", [404, 403, 410])
def test_permanent_http_errors_fail_at_once_with_the_status(
    server: MediaServer, video: Path, tmp_path: Path, status: int
) -> None:
    url = server.add("gone.mp4", video, status=status)
    with pytest.raises(DownloadFailure) as caught:
        fetch(url, tmp_path / "dl")
    assert caught.value.kind == "permanent"
    assert f"HTTP {status}" in str(caught.value)
    assert server.routes["/gone.mp4"].requests == ["GET"]  # no retry


def test_service_unavailable_is_retried_with_backoff_until_it_works(
    server: MediaServer, video: Path, tmp_path: Path
) -> None:
    retries: list[tuple[str, int, float]] = []
    path = fetch(server.add("busy.mp4", video, fail_first=2), tmp_path / "dl", retries)
    assert path.read_bytes() == video.read_bytes()
    assert [(kind, attempt) for kind, attempt, _ in retries] == [("transient", 1), ("transient", 2)]
    assert retries[1][2] > 0


def test_a_connection_dropped_mid_body_is_retried(server: MediaServer, video: Path, tmp_path: Path) -> None:
    retries: list[tuple[str, int, float]] = []
    # The first GET is yt-dlp looking at the URL, the second is the download: cut that one.
    path = fetch(server.add("flaky.mp4", video, drop_gets=(2,)), tmp_path / "dl", retries)
    assert path.read_bytes() == video.read_bytes()
    assert [kind for kind, _, _ in retries] == ["transient"]


def test_too_many_requests_backs_off_longer(server: MediaServer, video: Path, tmp_path: Path) -> None:
    retries: list[tuple[str, int, float]] = []
    fetch(server.add("limited.mp4", video, fail_first=1, fail_status=429), tmp_path / "dl", retries)
    kind, _, delay = retries[0]
    assert kind == "rate_limited"
    assert delay >= SETTINGS.download.rate_limited_backoff_seconds / 2  # jitter takes at most half off


def test_transient_failures_give_up_after_the_configured_attempts(
    server: MediaServer, video: Path, tmp_path: Path
) -> None:
    url = server.add("down.mp4", video, fail_first=100)
    with pytest.raises(DownloadFailure) as caught:
        fetch(url, tmp_path / "dl")
    assert caught.value.kind == "transient" and "HTTP 503" in str(caught.value)
    assert server.gets("down.mp4") == SETTINGS.download.attempts


def test_a_larger_file_than_allowed_is_abandoned(server: MediaServer, video: Path, tmp_path: Path) -> None:
    tiny = load_settings(None, {"download.max_filesize_mb": 0.001})
    with pytest.raises(DownloadFailure) as caught:
        download(server.add("big.mp4", video), tmp_path / "dl", tiny.download, tiny.output)
    assert caught.value.kind == "permanent" and "max_filesize_mb" in str(caught.value)
    assert not list((tmp_path / "dl").glob("*.mp4"))


def _chosen_format(options: dict[str, object], formats: list[dict[str, object]]) -> str:
    """Let yt-dlp's own selector pick from a made-up format list, without any network."""
    import yt_dlp

    info = {
        "id": "x",
        "title": "x",
        "extractor": "test",
        "extractor_key": "Test",
        "webpage_url": "http://x/x",
    }
    with yt_dlp.YoutubeDL({**options, "simulate": True, "quiet": True}) as ydl:
        chosen = ydl.process_ie_result({**info, "formats": formats}, download=False)
    return str(chosen["format_id"])


def test_the_default_format_is_the_smallest_video_only_stream_as_tall_as_the_output(tmp_path: Path) -> None:
    from daemon.download import ytdlp_options

    formats = [
        {"format_id": f"{h}v", "url": f"http://x/{h}v", "ext": "mp4", "height": h, "width": h * 16 // 9,
         "vcodec": "avc1", "acodec": "none", "tbr": h * 3}
        for h in (360, 480, 720, 1080, 2160)
    ] + [{"format_id": "720av", "url": "http://x/720av", "ext": "mp4", "height": 720, "width": 1280,
          "vcodec": "avc1", "acodec": "mp4a", "tbr": 2000}]  # fmt: skip
    options = ytdlp_options(SETTINGS.download, SETTINGS.output, tmp_path)
    assert _chosen_format(options, formats) == "720v"
    tall = load_settings(None, {"output.height": 1440, "output.width": 2560})
    assert _chosen_format(ytdlp_options(tall.download, tall.output, tmp_path), formats) == "2160v"
    small_only = [f for f in formats if f["height"] in (360, 480)]
    assert _chosen_format(options, small_only) == "480v"  # nothing tall enough: the best there is


def test_settings_for_large_runs_reach_yt_dlp(tmp_path: Path) -> None:
    from daemon.download import ytdlp_options

    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n")
    settings = load_settings(
        None,
        {
            "download.cookies_file": str(cookies),
            "download.proxy": "socks5://127.0.0.1:1080",
            "download.rate_limit": "5M",
            "download.sleep_interval_seconds": 2.5,
            "download.extra_options": {"geo_bypass": True, "retries": 4},
        },
    )
    options = ytdlp_options(settings.download, settings.output, tmp_path)
    assert options["cookiefile"] == str(cookies)
    assert options["proxy"] == "socks5://127.0.0.1:1080"
    assert options["ratelimit"] == 5 * 1024 * 1024
    assert options["sleep_interval_requests"] == 2.5
    assert options["geo_bypass"] is True and options["retries"] == 4  # extra options win
