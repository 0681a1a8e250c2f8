"""What every command-line entry point shares: logging set-up and one-line user errors."""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

from common.errors import UserError


def setup_logging(level: str = "INFO") -> None:
    level = getattr(logging, str(level).replace("logging.", "").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)     # also where logging was configured already (an embedding program)
    for noisy in ("urllib3", "PIL", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_output_dir(path: str, flag: str) -> None:
    """An output folder must be creatable and writable: one line naming the path and the problem
    (a file in the way, a file as a parent, no permission, a read-only file system), before any
    model loads. Nothing is created or changed here."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):            # the deepest part that exists decides
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        what = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise UserError(f"{flag} {path} {what}; choose a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable (permissions)")
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise UserError(f"{flag} {path}: {probe} is on a read-only file system")
    except (AttributeError, OSError):           # no statvfs (Windows): the access check stands
        pass


def check_output_file(path: str, flag: str) -> None:
    """A file to be written: not a folder, and its folder creatable and writable."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {os.path.abspath(path)} is a folder; give a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag)


def _close_progress_bars() -> None:
    """Finish any open tqdm bar first, so that the error is the last line printed."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()
    sys.stdout.flush()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`; a UserError becomes `error: ...` on stderr and exit code 2, without a traceback;
    Ctrl-C (or SIGTERM) exits 130 (checkpoints are written atomically, so nothing half-written is
    left). Open progress bars are closed first, so the message is the last line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("GLOG_v", "3")                  # MindSpore: errors only (set GLOG_v=2 for warnings)
    # MindSpore's runtime answers Ctrl-C by sending the process SIGTERM; treat that (and a
    # scheduler's SIGTERM) like Ctrl-C, so both backends stop the same way.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = main()
    except UserError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted; resume with --resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
