"""Local workers are forked from a server that loaded the pipeline and yt-dlp's URL patterns once:
a worker has them at its start, the server is no process of the run's once it ended, and a
signal to the whole process group does not take it down under the workers."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from daemon import workerserver


def what_a_worker_has(conn: Any) -> None:
    from yt_dlp.extractor import gen_extractor_classes

    conn.send(
        {
            "parent": os.getppid(),
            "pipeline": "daemon.worker" in sys.modules and "av" in sys.modules,
            # Compiled in the server: yt-dlp keeps a class's compiled URL pattern on the class.
            # (A few embed-only extractors have no URL of their own.)
            "patterns": sum("_VALID_URL_RE" in ie.__dict__ for ie in gen_extractor_classes()) > 1000,
        }
    )


def server_pid() -> int:
    from multiprocess import forkserver

    return forkserver._forkserver._forkserver_pid  # type: ignore[no-any-return]


def test_a_worker_starts_with_the_pipeline_and_url_patterns_loaded_and_the_server_ends_with_the_run() -> None:
    workerserver.start()
    context = workerserver.worker_context()

    def worker() -> dict[str, Any]:
        parent, child = context.Pipe()
        process = context.Process(target=what_a_worker_has, args=(child,))
        process.start()
        child.close()
        has = parent.recv()
        process.join(30)
        assert process.exitcode == 0
        return has  # type: ignore[no-any-return]

    try:
        first = worker()  # the server is up: it loaded everything before it forked this one
        pid = server_pid()
        os.kill(pid, signal.SIGHUP)  # a closing terminal's hang-up reaches the server too
        second = worker()
    finally:
        workerserver.stop()
    assert first == second == {"parent": pid, "pipeline": True, "patterns": True}
    assert not Path(f"/proc/{pid}").exists()  # ended and waited for: nothing left behind
