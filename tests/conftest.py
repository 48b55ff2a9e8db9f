from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server import MediaServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Small and fast: every test that runs the command line uses these settings.
FAST_CONFIG = """
stages = ["resize"]
[run]
start_delay = 0.0
grace_seconds = 20.0
[output]
width = 128
height = 80
[encode]
preset = "ultrafast"
codec = "cpu"
[download]
backoff_initial_seconds = 0.1
backoff_max_seconds = 0.5
rate_limited_backoff_seconds = 0.2
"""


def wait_for(what: str, condition: Callable[[], Any], deadline: float = 180.0) -> Any:
    """Poll `condition` until it returns something true, and return that; fail naming `what`."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server() -> Iterator[MediaServer]:
    with MediaServer() as running:
        yield running


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    """Folders of a run: clip files, outputs, temp, and a fast config file."""
    paths = {
        "clips": tmp_path / "clips",
        "out": tmp_path / "out",
        "temp": tmp_path / "temp",
        "media": tmp_path / "media",
        "config": tmp_path / "config.toml",
        "urls": tmp_path / "urls.txt",
    }
    for key in ("clips", "temp", "media"):
        paths[key].mkdir()
    paths["config"].write_text(FAST_CONFIG)
    return paths


def cli_command(workspace: dict[str, Path], *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "daemon",
        "--urls-file",
        str(workspace["urls"]),
        "--input-clip-dir",
        str(workspace["clips"]),
        "--output-dir",
        str(workspace["out"]),
        "--temp-dir",
        str(workspace["temp"]),
        "--config",
        str(workspace["config"]),
        *extra,
    ]


def run_command(
    command: list[str], cwd: Path = ROOT, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command as a user would, with this checkout importable; output captured as text."""
    env = env if env is not None else dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False
    )


def run_module(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m daemon ARGS`."""
    return run_command([sys.executable, "-m", "daemon", *args], cwd=cwd, timeout=timeout)


def run_cli(
    workspace: dict[str, Path], *extra: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return run_command(cli_command(workspace, *extra), timeout=timeout)


BLOCKER = """
import os
import sys

BLOCKED = {blocked!r}


class _NotInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(os.environ["BLOCKED_IMPORTS_LOG"], "a") as log:
                log.write(f"{{os.getpid()}} {{name}}\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled)
"""


def without_modules(tmp_path: Path, modules: tuple[str, ...]) -> tuple[dict[str, str], Path]:
    """An environment in which `modules` look not installed, to every Python process started with it
    (a sitecustomize, so spawned workers too), and the file where each attempt to import one is noted:
    an import that some code catches and ignores is still seen."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=modules))
    attempts = tmp_path / "blocked-imports.log"
    attempts.write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    env["BLOCKED_IMPORTS_LOG"] = str(attempts)
    return env, attempts


def on_terminal(command: list[str], columns: int, cwd: Path = ROOT) -> tuple[int, bytes]:
    """Run `command` on a pseudo-terminal `columns` wide; its exit status and every byte it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm", COLUMNS=str(columns))
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, cwd=cwd, env=env)
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(leader)
    return process.returncode, screen
