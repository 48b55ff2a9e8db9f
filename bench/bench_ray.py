"""Ray backend: how a job scales from one node to two, and how many ledger writes the driver makes.

Both nodes run on this machine inside a loopback-only network namespace (`unshare -n`, as root),
each `ray start` with one CPU and its own temp folder; the job is the same list of local sources
each time, alternating one node / two nodes, median of the runs. The ledger figure is the rate at
which the driver records finished clips (one SQLite transaction each), the one thing every clip of
every node passes through.

    python bench/bench_ray.py [--runs 3] [--sources 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemon.ledger import Ledger  # noqa: E402

from media import make_video  # noqa: E402

CONFIG = """
stages = ["resize"]
[run]
start_delay = 0.0
[output]
width = 256
height = 160
[encode]
preset = "medium"
codec = "cpu"
deterministic = true
"""

NODES = r"""
set -u
ip link set lo up
ray start --head --port=6393 --node-ip-address=127.0.0.1 --num-cpus=1 --temp-dir={head} \
    --include-dashboard=false --disable-usage-stats > /dev/null 2>&1 || exit 3
if [ {nodes} -ge 2 ]; then
    ray start --address=127.0.0.1:6393 --node-ip-address=127.0.0.1 --num-cpus=1 --temp-dir={second} \
        --disable-usage-stats > /dev/null 2>&1 || exit 4
fi
start=$(date +%s%N)
{command} > /dev/null 2>&1
code=$?
end=$(date +%s%N)
echo "milliseconds $(( (end - start) / 1000000 )) exit $code"
for pid in $(grep -las -e "{head}" -e "{second}" /proc/[0-9]*/cmdline | cut -d/ -f3 | grep -vx "$$"); do
    kill -9 "$pid" 2>/dev/null
done
"""


def job_seconds(work: Path, nodes: int) -> float:
    out = work / f"out-{nodes}-{time.monotonic_ns()}"
    head, second = (Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("bh", "bs"))
    command = " ".join(
        [
            sys.executable,
            "-m",
            "daemon",
            f"--urls-file={work / 'urls.txt'}",
            f"--input-clip-dir={work / 'clips'}",
            f"--output-dir={out}",
            f"--config={work / 'config.toml'}",
            f"--workers={nodes}",
            "--backend=ray",
            "--ray-address=127.0.0.1:6393",
        ]
    )
    script = NODES.format(head=head, second=second, nodes=nodes, command=command)
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    done = subprocess.run(["unshare", "-n", "bash", "-c", script], env=env, capture_output=True, text=True)
    shutil.rmtree(head, ignore_errors=True)
    shutil.rmtree(second, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    words = done.stdout.split()
    if "exit" not in words or words[words.index("exit") + 1] != "0":
        raise SystemExit(f"run on {nodes} node(s) failed: {done.stdout} {done.stderr}")
    return int(words[words.index("milliseconds") + 1]) / 1000


def ledger_writes_per_second(folder: Path, clips: int = 2000) -> float:
    ledger = Ledger(folder / "ledger.sqlite")
    ledger.add_url("https://example.com/v", "v", None)
    started = time.perf_counter()
    for index in range(clips):
        ledger.record_clip(
            "v", "https://example.com/v", index, index + 1, "done", path=f"/o/{index}", frames=1, size=1
        )
    seconds = time.perf_counter() - started
    ledger.close()
    return clips / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sources", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "clips").mkdir()
        (work / "config.toml").write_text(CONFIG)
        names = [f"v{index}" for index in range(args.sources)]
        for name in names:
            make_video(work / f"{name}.mp4", frames=900, width=256, height=160)
            (work / "clips" / f"{name}.txt").write_text("0 300\n300 600\n600 900\n")
        (work / "urls.txt").write_text("".join(f"{work / name}.mp4\n" for name in names))
        frames = args.sources * 900
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.runs):
            for nodes in (1, 2):
                times[nodes].append(job_seconds(work, nodes))
        print(f"machine: {os.cpu_count()} cores; {args.sources} sources x 900 frames, 256x160, x265 medium")
        for nodes, seconds in times.items():
            median = statistics.median(seconds)
            runs = " ".join(f"{s:.1f}" for s in seconds)
            print(
                f"{nodes} node(s), 1 CPU each: {median:.1f} s ({frames / median:.0f} frames/s); runs {runs}"
            )
        print(f"speed-up two nodes / one: {statistics.median(times[1]) / statistics.median(times[2]):.2f}x")
        print(f"ledger: {ledger_writes_per_second(work):.0f} clip records per second on the driver")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
