"""Shared fixtures: tiny models are made once per session from the architecture configs."""
from __future__ import annotations

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Several test processes share the cores (pytest-xdist), and the scripts they start inherit this
# environment: OpenMP threads that spin while waiting would steal each other's cores, and more
# threads than cores per process only add switching. Set before torch or MindSpore is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

TINY = {"v1": os.path.join(ROOT, "configs", "tiny-v1-inference.yaml"),
        "v2": os.path.join(ROOT, "configs", "tiny-v2-inference.yaml")}
SUBJECT = os.path.join(ROOT, "assets", "sample_subject")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'v1': path, 'v2': path} of tiny original-layout .safetensors checkpoints."""
    from common.arch import load_arch
    from common.formats.checkpoint_io import save_state_dict
    from common.formats.init_weights import random_weights

    folder = tmp_path_factory.mktemp("models")
    out = {}
    for version, config in TINY.items():
        path = str(folder / f"tiny-{version}.safetensors")
        save_state_dict(path, random_weights(load_arch(config), seed=0))
        out[version] = path
    return out


def free_port() -> int:
    """A TCP port nothing listens on now (tests run in parallel: no fixed ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The modules that take longest start first: with tests spread over processes by module
# (pytest-xdist --dist loadscope --no-loadscope-reorder, see the Makefile), a long module started
# last would run alone at the end.
_SLOW_FIRST = ("test_dreambooth_method.py", "test_train_ascend.py", "test_train_ascend_cli.py",
               "test_resume_parallel.py", "test_ascend_models.py", "test_cli.py", "test_ascend_pipeline.py",
               "test_mindone_compat.py", "test_long_prompts.py", "test_train_cuda.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
