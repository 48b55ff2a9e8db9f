"""The core install: a resize-only run imports no torch, in the supervisor or in a worker.

An environment without torch is made by `without_modules` (conftest): every process of the run,
workers included, refuses the model packages as if they were not installed, and notes each attempt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import cli_command, run_command, without_modules
from media import decoded_indices, make_video

BLOCKED = ("torch", "torchvision", "spandrel", "onnxruntime")


def without_torch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    return without_modules(tmp_path, BLOCKED)


def test_the_blocker_works(tmp_path: Path) -> None:
    env, attempts = without_torch(tmp_path)
    done = run_command([sys.executable, "-c", "import torch"], env=env)
    assert done.returncode == 1 and "No module named 'torch'" in done.stderr
    assert "torch" in attempts.read_text()


def test_a_resize_only_run_imports_no_torch_anywhere(workspace: dict[str, Path], tmp_path: Path) -> None:
    env, attempts = without_torch(tmp_path)
    source = make_video(workspace["media"] / "v.mp4", frames=40)
    workspace["urls"].write_text(f"{source}\n")
    (workspace["clips"] / "v.txt").write_text("0 10\n20 30\n")
    # `pad` too: its borders are drawn on the host array, not on tensors.
    workspace["config"].write_text(
        workspace["config"].read_text().replace("[output]", "[output]\nresize_mode = 'pad'")
    )
    done = run_command(cli_command(workspace, "--workers", "2"), env=env)
    assert done.returncode == 0, done.stderr
    made = sorted((workspace["out"] / "v").glob("*.hevc"))
    assert [p.name for p in made] == ["v_0000000_0000010.hevc", "v_0000020_0000030.hevc"]
    assert decoded_indices(made[1]) == list(range(20, 30))
    assert "worker 0 ready" in (workspace["out"] / "logs" / "worker-0.log").read_text()
    assert attempts.read_text() == ""  # no process of the run so much as looked for torch


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ("stages = ['upscale', 'resize']\n", "'upscale' stage needs torch"),
        ("stages = ['resize', 'matte']\n", "'matte' stage needs torch"),
    ],
)
def test_a_stage_whose_package_is_missing_stops_with_the_pip_line(
    workspace: dict[str, Path], tmp_path: Path, config: str, names: str
) -> None:
    env, _ = without_torch(tmp_path)
    source = make_video(workspace["media"] / "v.mp4", frames=10)
    workspace["urls"].write_text(f"{source}\n")
    (workspace["clips"] / "v.txt").write_text("0 5\n")
    workspace["config"].write_text(config + workspace["config"].read_text().split("\n", 2)[2])
    done = run_command(cli_command(workspace), env=env, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert names in lines[0] and "pip install 'download_and_process[models]'" in lines[0]
    assert not (workspace["out"] / "v").exists()
