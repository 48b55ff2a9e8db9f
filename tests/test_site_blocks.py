"""A site that blocks us: real yt-dlp against a loopback server that refuses every request for a
window of seconds (429 with Retry-After, a storm of 403s), then recovers. The run pauses the site
for all workers, probes it once per backoff period, charges nothing, and ends with every URL done."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yt_dlp.extractor.youtube._video as youtube_video
from yt_dlp.utils import DownloadError, ExtractorError

from daemon.config import load_settings
from daemon.download import JS_RUNTIME_INSTALL, DownloadFailure, classify, download, js_runtime_line
from daemon.failures import Kind, Scope
from daemon.sites import BLOCK_TEXTS, SiteBreakers, block_text, retry_after_seconds, site_of

from conftest import FAST_CONFIG, ROOT, cli_command, run_cli, run_module, wait_for
from media import make_video
from server import MediaServer

URLS = 30
WORKERS = 2
FIRST_WAIT_SECONDS = 1.0  # download.rate_limited_backoff_seconds, as a user in a hurry might set it
MAX_WAIT_SECONDS = 4.0  # download.site_block_max_seconds
WINDOW_SECONDS = 5.0

BLOCK_CONFIG = FAST_CONFIG.replace(
    "[run]\n", "[run]\nstate_dir = '{state}'\nretry_delay_seconds = 1.0\n"
).replace(
    "rate_limited_backoff_seconds = 0.2",
    f"rate_limited_backoff_seconds = {FIRST_WAIT_SECONDS}\nsite_block_max_seconds = {MAX_WAIT_SECONDS}",
)

YOUTUBE = "https://www.youtube.com/watch?v=BaW_jenozKc"


# --- the message table against the installed yt-dlp --------------------------------------------


@pytest.mark.parametrize("text", BLOCK_TEXTS, ids=[t.match for t in BLOCK_TEXTS])
def test_each_block_text_is_in_the_installed_youtube_extractor(text: object) -> None:
    assert text in BLOCK_TEXTS
    source = Path(youtube_video.__file__).read_text(encoding="utf-8")
    assert text.source in source, f"yt-dlp no longer says {text.source!r}: update daemon/sites.py"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "reason",
    [
        # YouTube's bot check as the extractor passes it on (its "sign in" branch adds the hint).
        "Sign in to confirm you\u2019re not a bot. Use --cookies-from-browser or --cookies for the "
        "authentication",
        "Video unavailable. YouTube is requiring a captcha challenge before playback",
        "This content isn't available, try again later. The current session has been rate-limited "
        "by YouTube for up to an hour",
    ],
)
def test_youtubes_block_messages_pause_the_site_and_charge_nothing(reason: str) -> None:
    error = DownloadError(f"ERROR: [youtube] BaW_jenozKc: {reason}")
    error.exc_info = (ExtractorError, ExtractorError(reason, expected=True), None)  # as YoutubeDL sets it
    failure = classify(YOUTUBE, error)
    assert failure.kind == "blocked" and failure.site_block
    condition = failure.failure(Path("/tmp"))
    assert (condition.scope, condition.kind, condition.where) == (Scope.SITE, Kind.CONDITION, "youtube")


def test_texts_that_are_not_blocks_stay_what_they_were() -> None:
    assert block_text("Sign in to confirm your age. This video may be inappropriate") is None
    assert classify(YOUTUBE, ExtractorError("Private video", expected=True)).kind == "permanent"


def test_sites_are_extractors_or_hosts_and_local_files_have_none() -> None:
    assert site_of(YOUTUBE) == site_of("https://youtu.be/BaW_jenozKc") == "youtube"
    assert site_of("http://127.0.0.1:8080/a.mp4") == "127.0.0.1:8080"
    assert site_of("/data/video.mp4") == ""


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds("Thu, 01 Jan 1970 00:02:00 GMT", now=60.0) == pytest.approx(60.0)
    assert retry_after_seconds("soon") == retry_after_seconds(None) == 0.0


def test_the_breaker_waits_for_retry_after_grows_to_its_ceiling_and_lets_one_probe_through() -> None:
    settings = load_settings(
        None, {"download.rate_limited_backoff_seconds": 10.0, "download.site_block_max_seconds": 30.0}
    ).download
    breaker = SiteBreakers(settings)
    opened = breaker.block("s", "429", retry_after=100.0, now=0.0)
    assert opened.new and opened.wait_seconds >= 100.0
    assert not breaker.take_start("s", 99.0) and breaker.take_start("other", 99.0)
    assert not breaker.block("s", "429 again", 0.0, 1.0).new  # the other worker's 429: same block
    assert breaker.take_start("s", 100.5)  # half-open: one probe
    assert not breaker.take_start("s", 100.6)
    waits = [breaker.block("s", "429", 0.0, 200.0).wait_seconds]
    for now in (1000.0, 2000.0, 3000.0):
        assert breaker.take_start("s", now)
        waits.append(breaker.block("s", "429", 0.0, now).wait_seconds)
    assert 15.0 <= waits[0] <= 20.0 and all(22.5 <= wait <= 30.0 for wait in waits[2:])
    assert breaker.succeeded("s", 3100.0) is not None and breaker.take_start("s", 3100.0)
    assert breaker.blocks_total == 1


def test_403s_block_a_site_only_across_different_urls() -> None:
    breaker = SiteBreakers(load_settings(None, {}).download)
    assert not breaker.forbidden("s", "a") and not breaker.forbidden("s", "a")
    assert breaker.forbidden("s", "b")
    breaker.succeeded("s", 0.0)
    assert not breaker.forbidden("s", "c")


def test_pacing_spaces_the_starts_of_one_site_over_all_workers() -> None:
    paced = SiteBreakers(load_settings(None, {"download.site_min_interval_seconds": 2.0}).download)
    assert paced.take_start("s", 10.0) and not paced.take_start("s", 11.0) and paced.take_start("t", 11.0)
    assert paced.take_start("s", 12.0) and paced.take_start("", 12.0)


# --- the download: a site signal ends a worker's try at once ----------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("media") / "tiny.mp4", frames=10)


def test_a_worker_stops_at_the_first_429_and_carries_retry_after(
    server: MediaServer, tiny: Path, tmp_path: Path
) -> None:
    settings = load_settings(None, {})
    url = server.add("limited.mp4", tiny, fail_first=5, fail_status=429)
    server.block_for("429", 60.0, retry_after="7")
    with pytest.raises(DownloadFailure) as caught:
        download(url, tmp_path / "dl", settings.download, settings.output, retry_site_blocks=False)
    failure = caught.value.failure(tmp_path)
    assert (failure.scope, failure.kind, failure.retry_after_seconds) == (Scope.SITE, Kind.CONDITION, 7.0)
    assert len(server.hits) == 1


def test_a_403_on_the_media_is_tried_once_more_and_stays_transient(
    server: MediaServer, tiny: Path, tmp_path: Path
) -> None:
    fast = load_settings(None, {"download.backoff_initial_seconds": 0.05})
    # Each attempt looks the page up (odd GETs), then fetches the media (even GETs).
    url = server.add("expired.mp4", tiny, fail_gets=(2,), fail_status=403)
    assert download(url, tmp_path / "ok", fast.download, fast.output, retry_site_blocks=False).is_file()
    url = server.add("refused.mp4", tiny, fail_gets=(2, 4, 6), fail_status=403)
    with pytest.raises(DownloadFailure) as caught:
        download(url, tmp_path / "dl", fast.download, fast.output, retry_site_blocks=False)
    assert (caught.value.kind, caught.value.http_status) == ("transient", 403)
    assert server.gets("refused.mp4") == 4  # one retry, not download.attempts
    failure = caught.value.failure(tmp_path)
    assert (failure.scope, failure.kind, failure.http_status) == (Scope.URL, Kind.TRANSIENT, 403)


# --- whole runs through a block window ----------------------------------------------------------


def _serve_urls(server: MediaServer, tiny: Path, workspace: dict[str, Path]) -> list[str]:
    urls = [server.add(f"v{n:02d}.mp4", tiny) for n in range(URLS)]
    workspace["urls"].write_text("".join(f"{url}\n" for url in urls))
    for n in range(URLS):
        (workspace["clips"] / f"v{n:02d}.txt").write_text("0 10\n")
    return urls


def _ledger(state: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{state / 'ledger.sqlite'}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    return db


def _done(state: Path) -> int:
    try:
        with _ledger(state) as db:
            return int(db.execute("SELECT count(*) FROM urls WHERE state = 'done'").fetchone()[0])
    except sqlite3.Error:
        return 0


def _run_through_block(
    server: MediaServer,
    tiny: Path,
    workspace: dict[str, Path],
    tmp_path: Path,
    mode: str,
    retry_after: str | None,
) -> tuple[subprocess.CompletedProcess[str], float, dict[str, object]]:
    state = tmp_path / "state"
    workspace["config"].write_text(BLOCK_CONFIG.format(state=state))
    _serve_urls(server, tiny, workspace)
    run = subprocess.Popen(
        cli_command(workspace, "--workers", str(WORKERS)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for("a few URLs done", lambda: _done(state) >= 3 or run.poll() is not None, deadline=120)
        began = server.block_for(mode, WINDOW_SECONDS, retry_after)

        def paused() -> dict[str, object] | None:
            shown = run_module("status", "--state-dir", str(state), "--json", timeout=60)
            data = json.loads(shown.stdout) if shown.returncode == 0 else {}
            sites = [c for c in data.get("conditions", []) if c.get("scope") == "site"]
            return sites[0] if sites else None

        shown = wait_for("status to show the paused site", paused, deadline=WINDOW_SECONDS + 10)
        out, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    return subprocess.CompletedProcess(run.args, run.returncode, out, err), began, shown


def _states(tmp_path: Path) -> dict[str, int]:
    with _ledger(tmp_path / "state") as db:
        rows = db.execute("SELECT state, failed_tries FROM urls").fetchall()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return counts


def _blocked_hits(server: MediaServer) -> list[float]:
    return [hit.at for hit in server.hits if hit.blocked]


def _probe_bound() -> int:
    """Requests a block may see: one in flight per worker when it begins, then one probe per
    backoff period (1 s, 2 s, then 4 s each) over the window, plus the one that finds it over."""
    probes, waited, wait = 0, 0.0, FIRST_WAIT_SECONDS
    while waited < WINDOW_SECONDS:
        waited += wait * 0.75  # the shortest a jittered wait can be
        wait = min(MAX_WAIT_SECONDS, wait * 2)
        probes += 1
    return WORKERS + probes


def test_a_429_window_with_retry_after_pauses_the_site_and_every_url_ends_done(
    server: MediaServer, tiny: Path, workspace: dict[str, Path], tmp_path: Path
) -> None:
    retry_after = 3.0
    done, began, shown = _run_through_block(server, tiny, workspace, tmp_path, "429", f"{retry_after:g}")
    assert done.returncode == 0, done.stderr
    assert _states(tmp_path) == {"done": URLS}
    assert shown["key"] == f"127.0.0.1:{server.httpd.server_address[1]}" and "429" in str(shown["reason"])
    hits = _blocked_hits(server)
    assert 1 <= len(hits) <= _probe_bound(), hits
    # Before Retry-After has passed since the first 429, only what was already in flight when
    # the block began arrives: at most one request per worker, never a retry or a probe.
    first = hits[0]
    before_retry_after = [hit for hit in server.hits if first <= hit.at < first + retry_after]
    assert len(before_retry_after) <= WORKERS, before_retry_after
    # One WARNING when the block opens and one when it ends, however many workers met it.
    assert len(re.findall(r"WARNING .* site \S+ blocks us", done.stderr)) == 1
    assert len(re.findall(r"WARNING .* site \S+ answers again after", done.stderr)) == 1
    assert "URLs that waited on a site block" in done.stderr
    assert "JavaScript runtime" in "".join(done.stderr.splitlines()[:3])  # said first
    assert began <= first


def test_a_storm_of_403s_pauses_the_site_and_marks_no_url_failed(
    server: MediaServer, tiny: Path, workspace: dict[str, Path], tmp_path: Path
) -> None:
    done, _, shown = _run_through_block(server, tiny, workspace, tmp_path, "403", None)
    assert done.returncode == 0, done.stderr
    assert _states(tmp_path) == {"done": URLS}
    assert "403" in str(shown["reason"])
    hits = _blocked_hits(server)
    assert 1 <= len(hits) <= _probe_bound() + 1, hits  # +1: the 403 before the run of them
    assert not re.search(r"WARNING .*try \d of \d failed", done.stderr.split("blocks us", 1)[1])


def test_a_bot_check_page_pauses_the_site_and_marks_no_url_failed(
    server: MediaServer, tiny: Path, workspace: dict[str, Path], tmp_path: Path
) -> None:
    # A 200 answer with an HTML page that says "not a bot" where the video should be: yt-dlp calls
    # the URL unsupported; the page says why.
    done, _, shown = _run_through_block(server, tiny, workspace, tmp_path, "bot", None)
    assert done.returncode == 0, done.stderr
    assert _states(tmp_path) == {"done": URLS}
    assert "bot check" in str(shown["reason"])
    assert "unsupported URL" not in done.stderr
    assert 1 <= len(_blocked_hits(server)) <= 2 * _probe_bound()  # yt-dlp's look-up, then our read


def test_an_ordinary_page_that_is_no_video_stays_unsupported(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    page = server.add("about.html", b"<html><body>About us: we make videos.</body></html>")
    server.routes["/about.html"].content_type = "text/html"
    workspace["urls"].write_text(f"{page}\n")
    (workspace["clips"] / "about.txt").write_text("0 10\n")
    done = run_cli(workspace, "--workers", "1")
    assert done.returncode == 1 and "unsupported URL" in done.stderr, done.stderr
    assert "blocks us" not in done.stderr


def test_a_block_past_block_give_up_hours_ends_the_run_with_its_urls_pending(
    server: MediaServer, tiny: Path, workspace: dict[str, Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    config = BLOCK_CONFIG.format(state=state) + "block_give_up_hours = 0.001\n"  # 3.6 s
    workspace["config"].write_text(config)
    _serve_urls(server, tiny, workspace)
    server.block_for("429", 3600.0)  # a block that never ends
    ended = run_cli(workspace, "--workers", str(WORKERS), timeout=120)
    assert ended.returncode == 1, ended.stderr
    assert len(re.findall(r"ERROR .*has blocked us for over 0.001 h", ended.stderr)) == 1
    assert _states(tmp_path) == {"pending": URLS}  # nothing failed, nothing charged
    assert len(server.hits) <= _probe_bound()


def test_the_run_says_which_javascript_runtime_yt_dlp_uses() -> None:
    found, line = js_runtime_line(load_settings(None, {}).download)
    assert found and line.startswith("yt-dlp's JavaScript runtime") and "deno" in line
    missing = load_settings(
        None, {"download.extra_options": {"js_runtimes": {"deno": {"path": "/none/deno"}}}}
    )
    found, line = js_runtime_line(missing.download)
    assert not found and JS_RUNTIME_INSTALL in line


def test_the_metrics_count_blocks_and_show_paused_sites() -> None:
    from prometheus_client import generate_latest

    from daemon.events import FleetSnapshot, SiteChanged
    from daemon.metrics import Metrics

    metrics = Metrics("127.0.0.1:0")
    try:
        metrics.on_event(SiteChanged("youtube", blocked=True, reason="HTTP 429"))
        metrics.on_event(SiteChanged("youtube", blocked=False))
        metrics.on_event(SiteChanged("example.com", blocked=True, reason="bot check"))
        ended = {"done": 0, "skipped": 0, "failed": 0}
        metrics.observe(FleetSnapshot(3, 1, None, ("example.com",), False, False, ended, 0))
        text = generate_latest(metrics.registry).decode()
    finally:
        metrics.close()
    assert re.search(r"^dap_site_blocks_total 2\.0$", text, re.M), text
    assert re.search(r"^dap_sites_paused 1\.0$", text, re.M)
    assert re.search(r"^dap_urls_queued 3\.0$", text, re.M)
