"""The Ray backend, on real Ray instances these tests start: the same outputs as the local backend,
crashes counted the same way, GPU slots as Ray resources, stop and resume across backends, and a
second node that dies mid-run.

Every Ray process a test starts, it stops by its own handles; `ray stop` is never called (it would
kill every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_one_shot import assert_all_clips_complete, ledger, no_partial_files, outputs, slow_workload

from conftest import ROOT, cli_command, wait_for
from media import decoded_indices, make_video
from server import MediaServer

RAY_ENV = {
    "PYTHONPATH": str(ROOT),
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # no token file written to the home folder by a test
}


def env() -> dict[str, str]:
    return dict(os.environ, **RAY_ENV)


def run(workspace: dict[str, Path], *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(workspace, *extra), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout
    )


def start(workspace: dict[str, Path], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command(workspace, *extra),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*/*.hevc"))}


def actor_pid(workspace: dict[str, Path], index: int = 0) -> int | None:
    log = workspace["out"] / "logs" / f"worker-{index}.log"
    if not log.exists():
        return None
    found = re.findall(r"ready as a Ray actor \(pid (\d+)", log.read_text())
    return int(found[-1]) if found else None


def three_sources(server: MediaServer, workspace: dict[str, Path]) -> None:
    """One download through yt-dlp and two local files, with overlapping and repeated clips."""
    media = workspace["media"]
    url = server.add("web.mp4", make_video(media / "web.mp4", frames=120, width=256, height=160))
    local = [make_video(media / f"{name}.mp4", frames=90, fps=25) for name in ("one", "two")]
    workspace["urls"].write_text("\n".join([url, *map(str, local)]) + "\n")
    (workspace["clips"] / "web.txt").write_text("0 30\n20 60\n100 120\n")
    (workspace["clips"] / "one.txt").write_text("0 45\n")
    (workspace["clips"] / "two.txt").write_text("10 20\n30 75\n")
    config = workspace["config"].read_text().replace("[encode]", "[encode]\ndeterministic = true")
    workspace["config"].write_text(config)


def test_both_backends_write_byte_identical_clips_with_deterministic_encoding(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    three_sources(server, workspace)
    local = run(workspace, "--workers", "2")
    assert local.returncode == 0, local.stderr
    made_locally = digests(workspace["out"])
    shutil.rmtree(workspace["out"])

    on_ray = run(workspace, "--workers", "2", "--backend", "ray")

    assert on_ray.returncode == 0, on_ray.stderr
    assert "Ray: a local instance" in on_ray.stderr and "Traceback" not in on_ray.stderr
    assert len(made_locally) == 6 and digests(workspace["out"]) == made_locally
    clip = workspace["out"] / "web" / "web_0000020_0000060.hevc"
    assert decoded_indices(clip) == list(range(20, 60))
    assert (workspace["out"] / "logs" / "worker-0.log").read_text().count("ready as a Ray actor") == 1
    no_partial_files(workspace)


def test_an_actor_killed_mid_url_is_a_crash_its_url_is_requeued_and_nothing_is_lost(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    slow_workload(server, workspace)
    running = start(workspace, "--workers", "1", "--backend", "ray")
    wait_for("a clip being encoded", lambda: list(workspace["out"].glob("long/*.part")), deadline=120)
    first = wait_for("the actor's pid in its log", lambda: actor_pid(workspace))
    os.kill(first, signal.SIGKILL)
    _, stderr = running.communicate(timeout=300)

    assert running.returncode == 0, stderr
    assert "worker 0 died (actor died:" in stderr and "goes back in the queue" in stderr
    assert actor_pid(workspace) not in (None, first)  # a new actor took its place
    assert_all_clips_complete(workspace)
    row = ledger(workspace)["long"]
    assert (row["state"], row["crashes"], row["attempts"]) == ("done", 1, 2)


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A Ray head this test starts with one unit of a custom resource; stopped by its own pids."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay short
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = Path(sys.executable).with_name("ray")
    started = subprocess.run(
        [
            str(ray),
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            '--resources={"gpu_slot": 1}',
            f"--temp-dir={temp}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        assert started.returncode == 0, started.stderr
        yield f"127.0.0.1:{port}"
    finally:
        kill_processes_using(temp)
        shutil.rmtree(temp, ignore_errors=True)


def kill_processes_using(temp: Path) -> None:
    """SIGKILL every process whose command line names `temp` (a node's processes all do), and
    their children."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp) in command:
            pids.add(int(entry.name))
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent in pids:
                children.add(int(entry.name))
    for pid in pids | children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def slot_intervals(workspace: dict[str, Path]) -> list[tuple[float, float]]:
    """(taken, given back) of every slot the workers held, from their debug log lines."""
    spans = []
    for log in (workspace["out"] / "logs").glob("worker-*.log"):
        taken: dict[str, float] = {}
        for line in log.read_text().splitlines():
            match = re.search(r"slot (taken|given back) at ([\d.]+) for (.+)$", line)
            if match:
                kind, at, what = match.groups()
                if kind == "taken":
                    taken[what] = float(at)
                else:
                    spans.append((taken.pop(what), float(at)))
    return sorted(spans)


def test_a_custom_ray_resource_lets_one_worker_at_a_time_process(
    server: MediaServer, workspace: dict[str, Path], ray_head: str
) -> None:
    three_sources(server, workspace)
    workspace["config"].write_text(
        workspace["config"].read_text().replace("[run]", '[run]\nray_slot_resource = "gpu_slot"')
    )
    done = run(
        workspace, "--workers", "2", "--backend", "ray", "--ray-address", ray_head, "--log-level", "DEBUG"
    )

    assert done.returncode == 0, done.stderr
    assert "Ray: 127.0.0.1:" in done.stderr
    spans = slot_intervals(workspace)
    assert len(spans) == 3  # one per URL
    for (_, given_back), (taken, _) in zip(spans, spans[1:], strict=False):
        assert taken >= given_back, spans  # never two at once, with two workers
    assert len(digests(workspace["out"])) == 6


def test_a_slot_held_by_an_actor_that_dies_is_given_back_to_the_next_one(
    server: MediaServer, workspace: dict[str, Path], ray_head: str
) -> None:
    """Ray keeps a dead actor's placement group while the driver lives: without giving it back, the
    replacement would wait for the only slot forever."""
    slow_workload(server, workspace)
    workspace["config"].write_text(
        workspace["config"].read_text().replace("[run]", '[run]\nray_slot_resource = "gpu_slot"')
    )
    running = start(workspace, "--workers", "1", "--backend", "ray", "--ray-address", ray_head)
    wait_for("a clip being encoded", lambda: list(workspace["out"].glob("long/*.part")), deadline=120)
    os.kill(wait_for("the actor's pid", lambda: actor_pid(workspace)), signal.SIGKILL)
    try:
        _, stderr = running.communicate(timeout=120)
    finally:
        if running.poll() is None:  # a slot never given back: the replacement waits for ever
            os.killpg(running.pid, signal.SIGKILL)

    assert running.returncode == 0, stderr
    assert "worker 0 died (actor died:" in stderr
    assert_all_clips_complete(workspace)


def test_a_run_stopped_on_ray_resumes_on_the_local_backend_and_the_other_way(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    slow_workload(server, workspace)
    # Queued pictures are encoded before a stop takes effect: a small queue keeps the stop mid-video
    # however fast the machine.
    workspace["config"].write_text(workspace["config"].read_text() + "[decode]\nbuffer_mb = 0.05\n")
    for first, then in (("ray", "local"), ("local", "ray")):
        shutil.rmtree(workspace["out"], ignore_errors=True)
        running = start(workspace, "--workers", "1", "--backend", first)
        wait_for(f"a clip finished on {first}", lambda: outputs(workspace), deadline=120)
        running.send_signal(signal.SIGTERM)
        _, stderr = running.communicate(timeout=120)
        assert running.returncode == 130, stderr
        made = outputs(workspace)
        assert 0 < len(made) < 9, made
        assert ledger(workspace)["long"]["state"] == "pending"

        resumed = run(workspace, "--workers", "1", "--backend", then)
        assert resumed.returncode == 0, resumed.stderr
        assert f"{len(made)} clip(s) already made" in resumed.stderr
        assert_all_clips_complete(workspace)
        for name, path in made.items():  # what the first backend made is kept, not made again
            assert outputs(workspace)[name].stat().st_mtime_ns == path.stat().st_mtime_ns


TWO_NODES = r"""
set -u
ip link set lo up
export RAY_health_check_period_ms=500 RAY_health_check_failure_threshold=3
export RAY_health_check_timeout_ms=500 RAY_health_check_initial_delay_ms=0
ray start --head --port=6391 --node-ip-address=127.0.0.1 --num-cpus=1 --temp-dir={head} \
    --include-dashboard=false --disable-usage-stats > {logs}/head.out 2>&1 || exit 3
ray start --address=127.0.0.1:6391 --node-ip-address=127.0.0.1 --num-cpus=1 --temp-dir={second} \
    --disable-usage-stats > {logs}/second.out 2>&1 || exit 4
{command} > {logs}/run.out 2> {logs}/run.err &
run=$!
# Once both workers hold a URL, the second node goes, every process of it at once.
for i in $(seq 600); do
    [ "$(grep -l 'processing local file' {out}/logs/worker-*.log 2>/dev/null | wc -l)" -ge 2 ] && break
    sleep 0.1
done
# Every process of the second node names its temp folder (this shell does too: it is left out).
pids=$(grep -las "{second}" /proc/[0-9]*/cmdline | cut -d/ -f3 | grep -vx "$$")
for pid in $pids; do pkill -9 -P "$pid"; done
kill -9 $pids
wait $run
echo "exit $?" >> {logs}/run.out
"""


def test_work_spreads_over_two_nodes_and_a_node_that_dies_mid_run_loses_nothing(
    workspace: dict[str, Path],
) -> None:
    media = workspace["media"]
    names = [f"v{index}" for index in range(8)]
    for name in names:
        make_video(media / f"{name}.mp4", frames=600, width=256, height=160)
        (workspace["clips"] / f"{name}.txt").write_text("0 200\n200 400\n400 600\n")
    workspace["urls"].write_text("".join(f"{media / name}.mp4\n" for name in names))
    # Slow enough (seconds per URL) that the node dies while both workers are busy.
    config = (
        workspace["config"]
        .read_text()
        .replace("width = 128", "width = 256")
        .replace("height = 80", "height = 160")
    )
    workspace["config"].write_text(config.replace('preset = "ultrafast"', 'preset = "medium"'))
    head, second = (Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("h", "s"))
    logs = workspace["media"]
    command = " ".join(
        cli_command(workspace, "--workers", "2", "--backend", "ray", "--ray-address", "127.0.0.1:6391")
    )
    script = TWO_NODES.format(
        head=head,
        second=second,
        logs=logs,
        command=command,
        out=workspace["out"],
    )
    path = dict(env(), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        subprocess.run(["unshare", "-n", "bash", "-c", script], env=path, timeout=600, check=False, cwd=ROOT)
    finally:
        kill_processes_using(head)
        kill_processes_using(second)
        shutil.rmtree(head, ignore_errors=True)
        shutil.rmtree(second, ignore_errors=True)
    stderr = (logs / "run.err").read_text()
    assert "exit 0" in (logs / "run.out").read_text(), stderr
    assert "Ray: 127.0.0.1:6391; 2 node(s)" in stderr
    assert "died (actor died:" in stderr  # the worker on the second node
    made = outputs(workspace)
    assert len(made) == 24
    for name, clip in made.items():
        start, end = (int(x) for x in clip.stem.split("_")[1:])
        assert decoded_indices(clip) == list(range(start, end)), name
    no_partial_files(workspace)
    assert {row["state"] for row in ledger(workspace).values()} == {"done"}
