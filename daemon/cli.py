"""Command line: every subcommand (`run`, `serve`, `status`, `logs`, `manifest`) and its checks.

The top of the import graph: nothing in the package imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from loguru import logger

from daemon import logs
from daemon.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from daemon.urls import UrlList

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
COMMANDS = ("run", "logs", "serve", "status", "manifest")
DEFAULT_CONFIG = Path("config.toml")


class UsageError(Exception):
    pass


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def _stages(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="settings file (default: ./config.toml if present)")
    parser.add_argument(
        "--workers",
        "-w",
        type=_workers,
        help="worker processes, or 'auto': 2 per processing slot (default 2)",
    )
    parser.add_argument("--start-delay", "-d", type=float, help="seconds between worker starts (default 15)")
    parser.add_argument("--width", type=int, help="output width (default 1280)")
    parser.add_argument("--height", type=int, help="output height (default 720)")
    parser.add_argument("--fps", type=float, help="output frames per second (default 30)")
    parser.add_argument("--device-id", type=int, help="GPU index (default 0)")
    parser.add_argument("--log-level", help="TRACE, DEBUG, INFO, SUCCESS, WARNING or ERROR (default INFO)")
    parser.add_argument("--temp-dir", help="where downloads go while they are processed")
    parser.add_argument(
        "--backend", choices=("local", "ray"), help="worker processes here, or Ray actors (default local)"
    )
    parser.add_argument("--ray-address", help="Ray cluster to join, e.g. HEAD:6379 (default: start one here)")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="also retry URLs that failed for permanent reasons",
    )
    parser.add_argument(
        "--stages", type=_stages, help="stages in order, e.g. upscale,resize,matte (default: resize)"
    )
    parser.add_argument("--preset", help="x265 preset, ultrafast … veryslow (default fast)")
    parser.add_argument("--clip-fps", type=float, help="frame rate the clip files count in (default 30)")
    parser.add_argument(
        "--resize-mode",
        choices=("crop", "pad", "stretch"),
        help="how frames reach the output size (default crop)",
    )


_FLAG_KEYS = {
    "workers": "run.workers",
    "start_delay": "run.start_delay",
    "width": "output.width",
    "height": "output.height",
    "fps": "output.fps",
    "device_id": "run.device_id",
    "log_level": "run.log_level",
    "temp_dir": "run.temp_dir",
    "retry_failed": "run.retry_failed",
    "backend": "run.backend",
    "ray_address": "run.ray_address",
    "stages": "stages",
    "preset": "encode.preset",
    "clip_fps": "clips.clip_fps",
    "resize_mode": "output.resize_mode",
}


def config_path(args: argparse.Namespace) -> Path | None:
    """--config, else ./config.toml when there is one, else None (the built-in defaults)."""
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return path


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {key: getattr(args, flag, None) for flag, key in _FLAG_KEYS.items()}
    return load_settings(config_path(args), overrides)


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, naming what is wrong, and exit status 2 (argparse's own error
    prints the whole usage first). The subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


USAGE = """\
download_and_process [run] -u URLS_FILE -c CLIP_DIR -o OUTPUT_DIR [options]
       download_and_process {serve,status,logs,manifest} [options]
       download_and_process --help | --version"""

COMMANDS_HELP = """\
commands:
  run       process a URL list once (the default command)
  serve     run as a service: process URL lists dropped into an inbox folder
  status    what the ledger says: counts, busy workers, throughput, errors
  logs      print or follow the log files
  manifest  write one row per clip written: the dataset's index
`download_and_process --help` shows every flag of `run`; `download_and_process COMMAND --help` those of
the others."""


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from daemon import __version__

    try:
        return f"download_and_process {version('download_and_process')}"
    except PackageNotFoundError:  # run from a checkout that is not installed
        return f"download_and_process {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="download_and_process",
        usage=USAGE,
        description="Download videos, cut the clips listed per video, write one HEVC stream per clip.",
        # Raw, so the run command's help below keeps its layout.
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", prog=parser.prog)

    run = sub.add_parser("run", help="process a URL list once (the default command)")
    run.add_argument(
        "--urls-file",
        "-u",
        type=Path,
        required=True,
        help="one URL or local file per line; '-' reads standard input (pipes and FIFOs work too)",
    )
    run.add_argument(
        "--input-clip-dir", "-c", type=Path, required=True, help="folder of <VIDEOID>.txt clip files"
    )
    run.add_argument("--output-dir", "-o", type=Path, required=True, help="where <VIDEOID>/… .hevc files go")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="read the list and the clip files, say per URL what would be fetched and which clips made; "
        "fetch nothing, write nothing",
    )
    _add_settings_flags(run)
    # The bare command is `run`, so its flags belong in the top-level help too.
    parser.epilog = "without a command, `run` is meant:\n\n" + run.format_help()

    config_help = "settings file, for run.log_dir / run.state_dir (default: ./config.toml if present)"
    show = sub.add_parser("logs", help="print or follow the log files")
    show.add_argument(
        "--output-dir", "-o", type=Path, help="output folder of the run (logs are in its logs/)"
    )
    show.add_argument("--log-dir", type=Path, help="log folder, if run.log_dir was set")
    show.add_argument("--config", type=Path, help=config_help)
    show.add_argument("--worker", type=int, help="only this worker's log (default: all, merged by time)")
    show.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    show.add_argument(
        "--since",
        type=_since,
        help="only records from then on: a time ago (90s, 15m, 2h, 1d) or a date and time (2026-05-01 10:00)",
    )
    show.add_argument(
        "--level",
        type=str.upper,
        choices=logs.LEVELS,
        metavar="LEVEL",
        help="only records at this level or above: " + ", ".join(logs.LEVELS),
    )

    manifest = sub.add_parser("manifest", help="write one row per clip written: the dataset's index")
    manifest.add_argument("--output-dir", "-o", type=Path, help="output folder of the run or service")
    manifest.add_argument("--state-dir", type=Path, help="folder of ledger.sqlite, if run.state_dir was set")
    manifest.add_argument("--config", type=Path, help=config_help)
    manifest.add_argument(
        "--format", choices=("jsonl", "csv", "parquet"), default="jsonl", help="default jsonl"
    )
    manifest.add_argument(
        "--out", type=Path, help="file to write (default: manifest.<format> in the output folder)"
    )

    serve = sub.add_parser("serve", help="run as a service: process URL lists dropped into an inbox folder")
    serve.add_argument("--inbox", "-i", type=Path, help="folder to watch for URL lists (service.inbox)")
    serve.add_argument("--input-clip-dir", "-c", type=Path, help="folder of <VIDEOID>.txt clip files")
    serve.add_argument("--output-dir", "-o", type=Path, help="where <VIDEOID>/… .hevc files go")
    serve.add_argument("--metrics-address", help="serve Prometheus metrics on HOST:PORT")
    _add_settings_flags(serve)

    status = sub.add_parser("status", help="what the ledger says: counts, busy workers, throughput, errors")
    status.add_argument("--output-dir", "-o", type=Path, help="output folder of the run or service")
    status.add_argument("--state-dir", type=Path, help="folder of ledger.sqlite, if run.state_dir was set")
    status.add_argument("--config", type=Path, help=config_help)
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    status.add_argument("--minutes", type=float, default=10.0, help="throughput window (default 10)")
    status.add_argument("--errors", type=int, default=5, help="how many recent errors to list (default 5)")
    status.add_argument(
        "--failed", action="store_true", help="only every failed URL and clip, each with its reason"
    )
    return parser


def _since(text: str) -> float:
    """--since: a Unix time, from `90s`/`15m`/`2h`/`1d` ago or from a local date and time."""
    import time
    from datetime import datetime

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip()
    if value[-1:] in units:
        try:
            return time.time() - float(value[:-1]) * units[value[-1]]
        except ValueError:
            pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time ago (90s, 15m, 2h, 1d) nor a date and time (2026-05-01 10:00)"
        ) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"usage: {USAGE}\n\n{COMMANDS_HELP}", file=sys.stderr)
        return EXIT_USAGE
    if argv[0] not in COMMANDS + ("-h", "--help", "--version"):
        argv.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "logs":
            return _logs(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "status":
            return _status(args)
        if args.command == "manifest":
            return _manifest(args)
        return _run(args)
    except (ConfigError, UsageError) as exc:
        print(f"download_and_process: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`… | head`): nothing more to say, and nowhere to say it. Python would
        # also complain when it flushes stdout at exit, so stdout points at /dev/null from here on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _logs(args: argparse.Namespace) -> int:
    from daemon.folders import log_dir_of

    settings = load_settings(config_path(args))
    return logs.show_logs(
        log_dir_of("logs", args.log_dir, args.output_dir, settings),
        args.worker,
        args.follow,
        since=args.since,
        level=args.level,
    )


def read_urls_file(given: Path) -> UrlList:
    """--urls-file: a file, `-` (standard input), or anything else that can be read once (a pipe from
    `<(…)`, /dev/stdin, a FIFO). Relative local paths in it are taken from the list's folder, or from
    the current folder for a list that is not a regular file."""
    from daemon.urls import read_url_list

    if str(given) == "-":
        return read_url_list(Path("<stdin>"), sys.stdin.buffer, base_dir=Path.cwd())
    if given.is_dir():
        raise UsageError(f"--urls-file {given}: a folder, not a file")
    if not given.exists():
        raise UsageError(f"--urls-file {given}: no such file")
    regular = given.is_file()
    where = given.resolve() if regular else given.absolute()
    try:
        with given.open("rb") as handle:
            return read_url_list(where, handle, base_dir=where.parent if regular else Path.cwd())
    except OSError as exc:
        raise UsageError(f"--urls-file {given}: cannot read it: {exc.strerror or exc}") from exc


def _run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not args.input_clip_dir.is_dir():
        raise UsageError(f"--input-clip-dir {args.input_clip_dir}: no such folder")
    if not args.dry_run and settings.run.backend != "ray":
        from daemon import workerserver

        # Local workers are forked from a server that loads what they run: started now, it loads
        # on another core while the supervisor imports, checks and opens what it needs.
        workerserver.start()
    url_list = read_urls_file(args.urls_file)
    if args.dry_run:
        from daemon.dryrun import dry_run

        dry_run(settings, url_list, args.input_clip_dir, args.output_dir)
        return EXIT_OK

    from daemon.checks import check_encoder, check_gpu, check_stages, loaded_line, say_js_runtime
    from daemon.folders import RunPaths
    from daemon.ledger import LedgerError
    from daemon.locking import AlreadyRunning, lock_run
    from daemon.progress import ProgressView
    from daemon.signals import install_signal_handlers
    from daemon.supervisor import Supervisor

    paths = RunPaths.from_settings(settings, args.input_clip_dir, args.output_dir)
    paths.check_writable()
    # Before the log is opened: a refused run writes nothing into the running one's log.
    try:
        lock = lock_run(paths, "run")
    except AlreadyRunning as exc:
        raise UsageError(str(exc)) from exc
    logs.configure_from_settings(
        "supervisor", logs.supervisor_log_path(paths.log_dir), settings.run, console=sys.stderr
    )
    # Every check that can stop the run comes before its first log line, which says what was loaded.
    check_stages(settings)
    backends = check_gpu(settings)
    check_encoder(settings, backends)
    logger.info(loaded_line(config_path(args), settings, backends, paths.output_dir, DEFAULT_CONFIG))
    say_js_runtime(settings)
    for problem in url_list.problems:
        logger.warning(problem)

    progress = ProgressView(len(url_list.sources), settings.run.progress_interval_seconds)
    supervisor = Supervisor(settings, paths, on_event=progress.on_event, lock=lock)
    try:
        supervisor.open()
    except LedgerError as exc:
        progress.stop()
        supervisor.close()
        logger.error(str(exc))
        return EXIT_FAILED
    install_signal_handlers(supervisor)
    # Also when none is rejected: lines rejected by an earlier run of a list since fixed are forgotten.
    supervisor.reject_lines(url_list.path, url_list.rejected)
    logger.info(
        f"{len(url_list.sources)} URL(s) from {url_list.path}; {settings.run.workers} "
        f"worker(s); output {paths.output_dir}; logs {paths.log_dir}"
    )
    try:
        for source in url_list.sources:
            supervisor.submit(source)
        supervisor.run_until_idle(should_continue=progress.tick)
    finally:
        supervisor.close()
        progress.stop()
    # Once, as a log line: on the terminal (stderr, with the rest of the run's lines) and in the log.
    logger.info(f"summary: {supervisor.totals.line()}")
    if supervisor.fatal:
        return EXIT_FAILED  # already said, in one line
    if supervisor.draining and len(supervisor.outcomes) < len(url_list.sources):
        logger.warning("stopped before every URL ended; run the same command again to resume")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if "failed" in supervisor.outcomes.values() else EXIT_OK


def _manifest(args: argparse.Namespace) -> int:
    from daemon.folders import LEDGER_NAME, state_dir_of
    from daemon.manifest import ManifestError, write_manifest

    settings = load_settings(config_path(args))
    state_dir = state_dir_of("manifest", args.state_dir, args.output_dir, settings)
    output_dir = args.output_dir or state_dir
    out = args.out or Path(output_dir) / f"manifest.{args.format}"
    try:
        written = write_manifest(state_dir / LEDGER_NAME, out, args.format)
    except ManifestError as exc:
        raise UsageError(f"manifest: {exc}") from exc
    print(f"manifest: {written.rows} clip(s) to {out}", file=sys.stderr)
    for problem in written.problems:
        print(f"manifest: {problem}", file=sys.stderr)
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    """`serve`: returns the exit status (0 after a requested stop)."""
    from daemon.checks import check_encoder, check_gpu, check_stages, loaded_line, say_js_runtime
    from daemon.folders import RunPaths, folder_problem
    from daemon.ledger import LedgerError
    from daemon.locking import AlreadyRunning, lock_run
    from daemon.service import InboxError, Service

    settings = settings_from_args(args)
    service = settings.service

    def folder(flag: Path | None, key: str, name: str) -> Path:
        value = flag or (Path(getattr(service, key)).expanduser() if getattr(service, key) else None)
        if value is None:
            raise UsageError(f"serve: give {name} or set service.{key} in the config")
        return Path(value)

    inbox = folder(args.inbox, "inbox", "--inbox")
    clip_dir = folder(args.input_clip_dir, "input_clip_dir", "--input-clip-dir")
    output_dir = folder(args.output_dir, "output_dir", "--output-dir")
    if not clip_dir.is_dir():
        raise UsageError(f"--input-clip-dir {clip_dir}: no such folder")
    if inbox.exists() and not inbox.is_dir():
        raise UsageError(f"--inbox {inbox}: not a folder")
    problem = folder_problem(inbox)
    if problem:
        raise UsageError(f"--inbox {inbox}: {problem}")
    paths = RunPaths.from_settings(settings, clip_dir, output_dir)
    paths.check_writable()
    # Before the log is opened: a refused start writes nothing into the holder's log.
    try:
        lock = lock_run(paths, "service")
    except AlreadyRunning as exc:
        raise UsageError(str(exc)) from exc
    logs.configure_from_settings(
        "supervisor", logs.supervisor_log_path(paths.log_dir), settings.run, console=sys.stderr
    )
    check_stages(settings)
    backends = check_gpu(settings)
    check_encoder(settings, backends)
    # The first line says what was loaded, as `run`'s does.
    logger.info(loaded_line(config_path(args), settings, backends, paths.output_dir, DEFAULT_CONFIG))
    say_js_runtime(settings)
    address = args.metrics_address if args.metrics_address is not None else service.metrics_address
    runner = Service(settings, paths, inbox.resolve(), address, lock=lock)
    logger.info(
        f"serving: inbox {runner.inbox_dir}; {settings.run.workers} worker(s); output {paths.output_dir}; "
        f"logs {paths.log_dir}"
    )
    try:
        runner.run()
    except (AlreadyRunning, InboxError) as exc:
        raise UsageError(str(exc)) from exc
    except LedgerError as exc:
        logger.error(str(exc))
        return EXIT_FAILED
    # Workers that cannot start: exit non-zero, so systemd marks the service failed and says why.
    return EXIT_FAILED if runner.supervisor.fatal else EXIT_OK


def _status(args: argparse.Namespace) -> int:
    import json

    from daemon.folders import LEDGER_NAME, state_dir_of
    from daemon.status import StatusError, format_failures, format_status, read_failures, read_status

    settings = load_settings(config_path(args))
    state_dir = state_dir_of("status", args.state_dir, args.output_dir, settings)
    if args.minutes <= 0 or args.errors < 0:
        raise UsageError("status: --minutes must be above 0 and --errors 0 or more")
    try:
        if args.failed:
            failures = read_failures(state_dir / LEDGER_NAME)
            if args.json:
                print(json.dumps({"failed": [failure.as_json() for failure in failures]}, indent=1))
            else:
                print(format_failures(failures))
            return EXIT_OK
        status = read_status(state_dir / LEDGER_NAME, args.minutes, args.errors)
    except StatusError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        print(json.dumps(status.as_json(), indent=1))
    else:
        print(format_status(status))
    return EXIT_OK
