"""How the program starts and ends: `download_and_process` and `python -m daemon` both come here."""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import sys
import threading
from typing import NoReturn

from daemon.cli import EXIT_FAILED, main


def entry() -> NoReturn:
    """The program's entry point (the console script and `python -m daemon`): `main`, then the end."""
    try:
        code = main()
    except OSError as exc:
        # What a command prints (`status`, `logs`) could not be written: a full disk or quota under
        # `… > file`. Files the commands name themselves report their own errors, with the path.
        if exc.filename is not None or exc.errno not in OUTPUT_FULL:
            raise
        print(f"download_and_process: cannot write the output: {exc.strerror}", file=sys.stderr)
        code = EXIT_FAILED
    end_process(code)


# The errors of a write to standard output that found no room.
OUTPUT_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def end_process(code: int) -> NoReturn:
    """Ends the process with `code`, without the interpreter's teardown where nothing needs it.

    Freeing the modules a run loaded (PyAV, yt-dlp, numpy, the pipeline) took about 0.2 s at the
    end of every run, after its last clip was in place and its summary said. The exit handlers
    still run (they close the log files and remove multiprocessing's temporary folder). Ray's
    shutdown and a thread still at work need the interpreter's own exit, so they get it."""
    working = [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
    ]
    if "ray" in sys.modules or working:
        raise SystemExit(code)
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers an ordinary exit runs, in their order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass  # the reader went away (`… | head`), as main() treats it
        except (OSError, ValueError) as exc:
            # Output cut short at the last flush (a full disk under `status > file`) must not
            # exit 0: an ordinary exit would fail too.
            with contextlib.suppress(Exception):
                print(f"download_and_process: cannot write the output: {exc}", file=sys.stderr)
            code = code or EXIT_FAILED
    os._exit(code)


if __name__ == "__main__":
    entry()
