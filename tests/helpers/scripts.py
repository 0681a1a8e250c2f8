"""Run the project's command-line scripts as users do, but inside the test process.

A fresh Python process per call costs about 8 s of CPU in imports alone (torch, diffusers, peft,
MindSpore); the suite makes about a hundred such calls. `run_script` runs the script's
`__main__` here instead, with its own argv, working folder, environment, stdout and stderr, and
returns what subprocess.run would: exit code (SystemExit's, or 1 with the traceback on stderr
for an uncaught exception), stdout, stderr (including log records and Python warnings).
What must be a process of its own (signals, msrun, accelerate, a blocked import) keeps
`fresh=True`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_script(script: str, *args, env: dict | None = None, cwd: str = ROOT, check: bool = True,
               fresh: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python script args...` from `cwd` (script relative to it); with check, a non-zero exit
    raises AssertionError with the ends of stdout and stderr."""
    argv = [script, *map(str, args)]
    if fresh:
        proc = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                              env=env or dict(os.environ, PYTHONUNBUFFERED="1"), timeout=timeout)
    else:
        proc = _in_process(argv, env, cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@contextlib.contextmanager
def _environment(env: dict | None):
    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _fresh_warning_filters() -> None:
    """The filters of a fresh interpreter (what `python script` shows, once per call)."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__", append=True)
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category, append=True)


def _in_process(argv, env, cwd) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    path = os.path.join(cwd, argv[0])
    root = logging.getLogger()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    argv0, path0, cwd0, level0 = sys.argv, list(sys.path), os.getcwd(), root.level
    sigterm0 = signal.getsignal(signal.SIGTERM)
    code = 0
    with _environment(env), warnings.catch_warnings(record=True) as caught:
        _fresh_warning_filters()
        root.addHandler(handler)
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(path))   # as `python script` does
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                err.write(f"{e.code}\n")
        except Exception:                      # noqa: BLE001  (a crash: exit 1 with its traceback)
            err.write(traceback.format_exc())
            code = 1
        finally:
            root.removeHandler(handler)
            sys.argv, sys.path[:] = argv0, path0
            os.chdir(cwd0)
            root.setLevel(level0)
            signal.signal(signal.SIGTERM, sigterm0)
    for w in caught:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
