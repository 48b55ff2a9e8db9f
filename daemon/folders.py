"""Where a run keeps its files: the one place that names the folders and the files in them.

Everything below the command line may import this; it imports nothing of the project but the
settings, so the commands that only read a run (`status`, `logs`, `manifest`) find its files by
the same rules the run used to place them.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from daemon.config import ConfigError, Settings
from daemon.partfile import PART_SUFFIX as PART_SUFFIX  # how an unfinished file is named

LEDGER_NAME = "ledger.sqlite"
LOCK_NAME = ".download_and_process.lock"
STATUS_FILE = "service.json"  # what a running service last published about itself, beside the ledger


def _setting(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class RunPaths:
    clip_dir: Path
    output_dir: Path
    state_dir: Path
    temp_root: Path
    log_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings, clip_dir: Path, output_dir: Path) -> RunPaths:
        output_dir = output_dir.resolve()
        base = _setting(settings.run.temp_dir) or Path(tempfile.gettempdir())
        # One temp root per output folder, so two runs on different outputs never clean each other's.
        tag = hashlib.sha1(str(output_dir).encode()).hexdigest()[:10]
        return cls(
            clip_dir=clip_dir.resolve(),
            output_dir=output_dir,
            state_dir=state_dir_of("run", None, output_dir, settings).resolve(),
            temp_root=base.resolve() / f"download_and_process-{tag}",
            log_dir=log_dir_of("run", None, output_dir, settings).resolve(),
        )

    @property
    def ledger(self) -> Path:
        return self.state_dir / LEDGER_NAME

    def worker_temp(self, index: int) -> Path:
        """A worker's own folder for its download, emptied after every URL."""
        return self.temp_root / f"worker-{index}"

    @property
    def slot_dir(self) -> Path:
        """The run's processing slots (daemon.lockslots): lock files its workers share."""
        return self.temp_root / "processing-slots"

    def check_writable(self) -> None:
        """Create every folder the run writes to and write a file in each, before any download.

        A folder that cannot be used raises ConfigError naming the folder, its setting and why."""
        for what, folder in (
            ("output folder (--output-dir)", self.output_dir),
            ("state folder (run.state_dir)", self.state_dir),
            ("temp folder (--temp-dir, run.temp_dir)", self.temp_root.parent),
            ("log folder (run.log_dir)", self.log_dir),
        ):
            problem = folder_problem(folder)
            if problem:
                raise ConfigError(f"{what} {folder}: {problem}")


def state_dir_of(command: str, state_dir: Path | None, output_dir: Path | None, settings: Settings) -> Path:
    """The ledger's folder: --state-dir, then run.state_dir, then the output folder (--output-dir,
    then the service's), as a run placed it."""
    folder = state_dir or _setting(settings.run.state_dir) or _output_dir(output_dir, settings)
    if folder is None:
        raise ConfigError(f"{command}: give --output-dir (or --state-dir)")
    return Path(folder)


def log_dir_of(command: str, log_dir: Path | None, output_dir: Path | None, settings: Settings) -> Path:
    """The log folder: --log-dir, then run.log_dir, then `logs` in the output folder."""
    folder = log_dir or _setting(settings.run.log_dir)
    if folder is None:
        output = _output_dir(output_dir, settings)
        if output is None:
            raise ConfigError(f"{command}: give --output-dir (or --log-dir)")
        folder = output / "logs"
    return Path(folder)


def _output_dir(output_dir: Path | None, settings: Settings) -> Path | None:
    return Path(output_dir) if output_dir else _setting(settings.service.output_dir)


def folder_problem(folder: Path) -> str:
    """Why `folder` cannot be created or written to, or "" when it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        return f"cannot be created: {blocker} is a file, not a folder"
    except OSError as exc:
        return f"cannot be created: {exc.strerror or exc}"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot be written to: {exc.strerror or exc}"
    return ""
