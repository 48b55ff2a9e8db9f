"""`download_and_process serve`, run for real as a child process in its own process group.

Every test ends by checking the ledger (each URL done or failed with its reason, or pending when the
service was stopped) and every clip file on disk (decoded: all its frames, in order).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_settings

from conftest import wait_for
from media import decoded_indices, make_video
from server import MediaServer

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
DEADLINE_SECONDS = 180.0

BASE_CONFIG = """
stages = ["resize"]
[run]
workers = 1
start_delay = 0.0
grace_seconds = {grace}
temp_dir = "{temp}"
[output]
width = {width}
height = {height}
[encode]
preset = "ultrafast"
codec = "cpu"
[download]
attempts = 1
max_filesize_mb = {max_mb}
rate_limit = "{rate}"
[service]
settle_seconds = 0.5
min_free_temp_mb = {floor}
min_free_output_mb = 0
disk_check_seconds = 0.5
metrics_address = "{metrics}"
"""


class Workspace:
    def __init__(self, root: Path, server: MediaServer) -> None:
        self.root = root
        self.server = server
        for name in ("clips", "media", "inbox", "temp"):
            (root / name).mkdir()
        self.inbox = root / "inbox"
        self.out = root / "out"
        self.temp = root / "temp"
        self.config = root / "config.toml"
        self.expected: dict[Path, list[int]] = {}  # clip file -> the source frames it must show
        self.processes: list[subprocess.Popen[bytes]] = []
        self.configure()

    def configure(self, **values: Any) -> None:
        settings = dict(
            grace=60.0, temp=self.temp, width=128, height=80, max_mb=0.0, rate="", floor=0, metrics=""
        )
        settings.update(values)
        self.config.write_text(BASE_CONFIG.format(**settings))

    def video(self, name: str, clips: list[tuple[int, int]], frames: int = 60, **make: Any) -> str:
        """Serve a test video and write its clip file; returns its URL."""
        path = make_video(self.root / "media" / f"{name}.mp4", frames=frames, **make)
        (self.root / "clips" / f"{name}.txt").write_text("".join(f"{a} {b}\n" for a, b in clips))
        for start, end in clips:
            self.expected[self.out / name / f"{name}_{start:07d}_{end:07d}.hevc"] = list(range(start, end))
        return self.server.add(f"{name}.mp4", path)

    def drop(self, name: str, urls: list[str]) -> None:
        """Drop a list the way a careful program does: write it beside, then move it in."""
        staging = self.root / f"{name}.staging"
        staging.write_text("".join(url + "\n" for url in urls))
        os.rename(staging, self.inbox / name)

    def start(self, notify_socket: Path | None = None) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = str(notify_socket)
        log = (self.root / f"service-{len(self.processes)}.log").open("wb")
        command = [sys.executable, "-m", "daemon", "serve", "--config", str(self.config)]
        command += ["--inbox", str(self.inbox), "-c", str(self.root / "clips"), "-o", str(self.out)]
        process = subprocess.Popen(
            command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], *signals: signal.Signals) -> int:
        for number in signals:
            process.send_signal(number)
            time.sleep(0.2)
        return process.wait(timeout=DEADLINE_SECONDS)

    def log(self) -> str:
        path = self.out / "logs" / "supervisor.log"
        return path.read_text() if path.exists() else ""

    def urls(self) -> dict[str, tuple[str, str | None]]:
        """URL -> (state, error), from the ledger, read-only as an operator would."""
        path = self.out / "ledger.sqlite"
        if not path.exists():
            return {}
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            return {
                url: (state, error) for url, state, error in db.execute("SELECT url, state, error FROM urls")
            }

    def state(self, url: str) -> str | None:
        return self.urls().get(url, (None, None))[0]

    def filed(self, folder: str, name: str) -> str | None:
        """The report of a list once it has been moved to done/ or failed/."""
        report = self.inbox / folder / f"{name}.report.txt"
        return report.read_text() if report.exists() and (self.inbox / folder / name).exists() else None

    def check_outputs(self) -> None:
        """Every clip file on disk is complete; nothing is left half-written under any name."""
        assert not list(self.out.rglob("*.part"))
        for path in self.out.rglob("*.hevc"):
            assert path in self.expected, f"unexpected output {path}"
            assert decoded_indices(path) == self.expected[path], path

    def worker_temp_folders(self) -> list[Path]:
        return list(self.temp.glob("download_and_process-*/worker-*"))


@pytest.fixture
def media_server() -> Iterator[MediaServer]:
    with MediaServer() as running:
        yield running


@pytest.fixture
def ws(tmp_path: Path, media_server: MediaServer) -> Iterator[Workspace]:
    workspace = Workspace(tmp_path, media_server)
    yield workspace
    for process in workspace.processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_lists_present_at_start_and_dropped_later_are_processed_once_and_filed(ws: Workspace) -> None:
    port = free_port()
    ws.configure(metrics=f"127.0.0.1:{port}")
    early = [ws.video("one", [(0, 20), (30, 50)]), ws.video("two", [(5, 25)])]
    ignored = ws.video("ignored", [(0, 10)])
    (ws.inbox / "early.txt").write_text("\n".join(early) + "\n")
    for name in (".hidden.txt", "early.txt~", ".early.txt.swp", "#early.txt#"):
        (ws.inbox / name).write_text(ignored + "\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(ws.root / "notify.sock"))
    notified: list[str] = []
    threading.Thread(target=lambda: _collect(notify, notified), daemon=True).start()
    service = ws.start(ws.root / "notify.sock")

    wait_for("READY=1", lambda: "READY=1" in notified)
    report = wait_for("early.txt in done/", lambda: ws.filed("done", "early.txt"))
    assert "result: done: 2 URL(s): 2 done, 0 partial, 0 skipped, 0 failed; 0 clip error(s)" in report
    assert all(f"done\t{url}" in report for url in early)
    assert not (ws.inbox / "claimed" / "early.txt").exists()

    # A follower started now sees what the running service logs from here on.
    follower = subprocess.Popen(
        [sys.executable, "-m", "daemon", "logs", "-o", str(ws.out), "--follow"],
        cwd=ws.root,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    followed: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(
        target=lambda: [followed.put(line) for line in follower.stdout or []], daemon=True
    ).start()
    try:
        wait_for("the follower to print the log so far", lambda: _seen(followed, "list early.txt ended"))
        one_gets = ws.server.gets("one.mp4")
        late = ws.video("three", [(10, 40)])
        ws.drop("late.txt", [late, early[0]])  # one URL again: made once, reported in both lists
        wait_for("late.txt in done/", lambda: ws.filed("done", "late.txt"))
        wait_for("the claim in the followed log", lambda: _seen(followed, "claimed list late.txt"))
    finally:
        follower.terminate()
        follower.wait(timeout=30)

    assert ws.urls() == {url: ("done", None) for url in [*early, late]}
    assert ws.server.gets("three.mp4") >= 1 and ws.server.gets("one.mp4") == one_gets
    assert ws.server.gets("ignored.mp4") == 0
    assert sorted(p.name for p in ws.inbox.iterdir() if p.is_file()) == sorted(
        [".hidden.txt", "early.txt~", ".early.txt.swp", "#early.txt#"]
    )
    ws.check_outputs()
    assert len(list(ws.out.rglob("*.hevc"))) == 4

    status = subprocess.run(
        [sys.executable, "-m", "daemon", "status", "-o", str(ws.out), "--json"],
        cwd=ws.root,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        check=True,
    )
    document = json.loads(status.stdout)
    assert document["counts"]["done"] == 3 and document["service"]["pid"] == service.pid
    assert document["throughput"]["clips_written"] == 4

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    assert 'dap_clips_total{state="done"} 4.0' in metrics
    assert re.search(r"^dap_frames_written_total 90\.0$", metrics, re.M)

    # Idle: no list settling, nothing queued. The service waits on events, not in a loop.
    before = cpu_seconds(service.pid)
    time.sleep(5)
    assert cpu_seconds(service.pid) - before < 0.5

    assert ws.stop(service, signal.SIGTERM) == 0
    wait_for("STOPPING=1", lambda: "STOPPING=1" in notified)
    assert notified.index("READY=1") < notified.index("STOPPING=1")
    assert any(m.startswith("STATUS=") and "done 3" in m for m in notified)
    assert ws.worker_temp_folders() == []
    assert not (ws.out / "service.json").exists()


def _collect(notify: socket.socket, into: list[str]) -> None:
    while True:
        into.extend(notify.recv(4096).decode().split("\n"))


def _seen(lines: queue.SimpleQueue[str], text: str) -> bool:
    while not lines.empty():
        if text in lines.get():
            return True
    return False


def test_a_list_still_being_written_is_not_read_and_failures_are_reported(ws: Workspace) -> None:
    ws.configure(max_mb=0.02)  # about 21 KB: the small videos pass, the big one does not
    small = ws.video("small", [(0, 30)])
    big = ws.video("big", [(0, 30)], frames=120, width=640, height=368)
    missing = ws.server.add("gone.mp4", b"", status=404)
    (ws.root / "clips" / "gone.txt").write_text("0 10\n")
    service = ws.start()
    wait_for("the inbox to be watched", lambda: "watching" in ws.log())

    writer = (ws.inbox / "slow.txt").open("w")
    writer.write(f"{small}\n{big[: len(big) // 2]}")
    writer.flush()
    ws.drop("other.txt", [missing])  # proves the inbox is being watched meanwhile
    wait_for("other.txt in failed/", lambda: ws.filed("failed", "other.txt"))
    time.sleep(2)  # four settle periods
    assert (ws.inbox / "slow.txt").exists() and small not in ws.urls()
    writer.write(f"{big[len(big) // 2 :]}\n")
    writer.close()

    report = wait_for("slow.txt in failed/", lambda: ws.filed("failed", "slow.txt"))
    assert "result: failed: 2 URL(s): 1 done, 0 partial, 0 skipped, 1 failed; 0 clip error(s)" in report
    urls = ws.urls()
    assert urls[small] == ("done", None)
    assert urls[big][0] == "failed" and "larger than download.max_filesize_mb" in str(urls[big][1])
    assert urls[missing][0] == "failed" and "HTTP 404" in str(urls[missing][1])
    assert f"failed\t{big}\tdownload: larger than download.max_filesize_mb" in report
    ws.check_outputs()
    assert not (ws.out / "big").exists()
    assert ws.stop(service, signal.SIGTERM) == 0


def test_sigterm_mid_clip_finishes_that_clip_and_the_rest_resumes_at_the_next_start(ws: Workspace) -> None:
    ws.configure(width=256, height=160)
    long = ws.video("long", [(0, 900), (960, 1000)], frames=1010, width=256, height=160)
    after = ws.video("after", [(0, 20)])
    ws.drop("work.txt", [long, after])
    service = ws.start()
    parts = ws.out / "long"
    wait_for(
        "the first clip being encoded",
        lambda: any(parts.glob("long_0000000_0000900.hevc.*.part")),
        deadline=DEADLINE_SECONDS,
    )
    assert ws.stop(service, signal.SIGTERM) == 0

    first, second = sorted(p for p in ws.expected if p.parent.name == "long")
    assert first.exists() and not second.exists()
    assert ws.urls() == {long: ("pending", None), after: ("pending", None)}
    assert (ws.inbox / "claimed" / "work.txt").exists()
    assert ws.worker_temp_folders() == []
    ws.check_outputs()
    made_at = first.stat().st_mtime_ns

    service = ws.start()
    wait_for("work.txt in done/", lambda: ws.filed("done", "work.txt"))
    assert ws.urls() == {long: ("done", None), after: ("done", None)}
    assert first.stat().st_mtime_ns == made_at  # finished clips are not made again
    ws.check_outputs()
    assert all(path.exists() for path in ws.expected)
    assert ws.stop(service, signal.SIGINT) == 0


def test_a_second_signal_stops_at_once(ws: Workspace) -> None:
    ws.configure(grace=600.0, rate="500")  # a 42 KB download at 500 B/s: well over a minute
    slow = ws.video("slow", [(0, 30)], frames=120, width=640, height=368)
    ws.drop("slow.txt", [slow])
    service = ws.start()
    wait_for("the download to start", lambda: ws.server.gets("slow.mp4") >= 1)
    started = time.monotonic()
    service.send_signal(signal.SIGTERM)
    wait_for("the first signal to be taken", lambda: "stopping: no new URLs" in ws.log())
    assert service.poll() is None  # still waiting for the download in flight
    service.send_signal(signal.SIGTERM)
    service.wait(timeout=DEADLINE_SECONDS)
    assert time.monotonic() - started < 40  # the download alone would take longer
    assert "again: stopping at once" in ws.log()
    assert ws.urls() == {slow: ("pending", None)}
    assert ws.worker_temp_folders() == []
    ws.check_outputs()


def test_after_sigkill_of_the_whole_group_the_next_start_resumes(ws: Workspace) -> None:
    urls = [ws.video(f"v{i}", [(0, 20), (25, 45)]) for i in range(3)]
    ws.drop("crash.txt", urls)
    service = ws.start()
    wait_for("a first clip", lambda: list(ws.out.rglob("*.hevc")))
    os.killpg(service.pid, signal.SIGKILL)
    service.wait(timeout=30)
    assert {state for state, _ in ws.urls().values()} - {"done"}  # the kill came mid-run
    assert (ws.inbox / "claimed" / "crash.txt").exists()

    service = ws.start()
    report = wait_for("crash.txt in done/", lambda: ws.filed("done", "crash.txt"))
    assert "3 done, 0 partial, 0 skipped, 0 failed" in report
    assert ws.urls() == {url: ("done", None) for url in urls}
    ws.check_outputs()
    assert all(path.exists() for path in ws.expected)
    assert ws.stop(service, signal.SIGTERM) == 0


def test_downloads_wait_while_disk_space_is_below_the_floor(ws: Workspace) -> None:
    ws.configure(floor=2**40)  # a floor above any free space: the disk counts as full
    url = ws.video("wait", [(0, 20)])
    ws.drop("full.txt", [url])
    service = ws.start()
    wait_for("the list to be claimed", lambda: (ws.inbox / "claimed" / "full.txt").exists())
    wait_for("the pause to be logged", lambda: "downloads paused" in ws.log())
    time.sleep(3)  # several disk checks
    assert ws.log().count("downloads paused") == 1
    assert ws.state(url) == "pending" and ws.server.gets("wait.mp4") == 0
    published = json.loads((ws.out / "service.json").read_text())
    assert "below the floor" in published["paused"]
    assert ws.stop(service, signal.SIGTERM) == 0

    ws.configure(floor=0)
    service = ws.start()
    wait_for("full.txt in done/", lambda: ws.filed("done", "full.txt"))
    assert ws.state(url) == "done"
    ws.check_outputs()
    assert ws.stop(service, signal.SIGTERM) == 0


def test_serve_without_an_inbox_is_a_usage_error(ws: Workspace) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--config", str(ws.config), "-c", str(ws.root / "clips")],
        cwd=ws.root,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "serve: give --inbox or set service.inbox in the config" in result.stderr


# --- the systemd unit -----------------------------------------------------------------------------


def unit_entries() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in (SYSTEMD / "download_and_process.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            entries.setdefault(key, []).append(value)
    return entries


def test_the_unit_restarts_on_failure_notifies_and_is_hardened() -> None:
    unit = unit_entries()
    expected = {
        "Type": "notify",
        "Restart": "on-failure",
        "KillMode": "mixed",  # SIGTERM reaches the supervisor only; it stops the workers itself
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "User": "download_and_process",
    }
    assert {key: unit[key][-1] for key in expected} == expected
    assert "${DAP_CONFIG}" in unit["ExecStart"][0] and "serve --config" in unit["ExecStart"][0]


def test_the_example_config_is_valid_and_matches_the_unit() -> None:
    settings = load_settings(SYSTEMD / "config.toml")
    unit = unit_entries()
    writable = set(unit["ReadWritePaths"][0].split())
    assert {settings.service.inbox, settings.service.output_dir} <= writable
    assert settings.run.state_dir == "/var/lib/" + unit["StateDirectory"][0]
    assert settings.run.log_dir == "/var/log/" + unit["LogsDirectory"][0]
    assert settings.run.temp_dir.startswith("/var/cache/" + unit["CacheDirectory"][0] + "/")
    timeout = float(unit["TimeoutStopSec"][0].removesuffix("s"))
    assert settings.run.grace_seconds + 15 <= timeout  # room for workers to exit after the grace period


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists. The unit goes, unchanged, into a scratch root
    # holding the system's own units and a stand-in program at ExecStart's path.
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    unit = root / "etc/systemd/system/download_and_process.service"
    unit.parent.mkdir(parents=True)
    shutil.copy(SYSTEMD / "download_and_process.service", unit)
    program = root / unit_entries()["ExecStart"][0].split()[0].lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "download_and_process" in line
    ]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr
