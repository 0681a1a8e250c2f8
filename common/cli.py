"""What every command-line entry point shares: logging set-up and one-line user errors."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from .errors import UserError


def setup_logging(level: str = "INFO") -> None:
    level = str(level).replace("logging.", "").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("urllib3", "PIL", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`; a UserError becomes `error: ...` on stderr and exit code 2, without a traceback;
    Ctrl-C exits 130 (checkpoints are written atomically, so nothing half-written is left)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("GLOG_v", "3")                  # MindSpore: errors only (set GLOG_v=2 for warnings)
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
