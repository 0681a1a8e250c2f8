"""State dict files: round trips, safe pickle loading, corrupt files, atomic non-clobbering writes."""
import os
import pickle

import numpy as np
import pytest

from common.formats.checkpoint_io import load_state_dict, save_state_dict
from common.errors import UserError

try:                      # .ckpt files need PyTorch; the safetensors tests run without it
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch")
TORCH_EXTS = [pytest.param(e, marks=needs_torch) for e in (".ckpt", ".pt")]


def sample_sd():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((4, 3), dtype=np.float32),
        "a.bias": rng.standard_normal(4).astype(np.float16),
        "scalar": np.array(2.5, np.float32),
        "ids": np.arange(7, dtype=np.int64)[None],
    }


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


class Evil:
    """Unpickling this runs a shell command (if the loader were unsafe)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


@pytest.mark.parametrize("ext", [".safetensors"] + TORCH_EXTS)
def test_round_trip_keeps_dtypes(tmp_path, ext):
    sd = sample_sd()
    path = tmp_path / f"model{ext}"
    save_state_dict(str(path), sd, metadata={"format": "pt", "step": 3})
    assert_same(load_state_dict(str(path)), sd)
    assert os.listdir(tmp_path) == [path.name]          # no temp files left behind


def test_safetensors_metadata(tmp_path):
    from safetensors import safe_open
    path = str(tmp_path / "m.safetensors")
    save_state_dict(path, sample_sd(), metadata={"format": "pt", "info": {"steps": 3}})
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"format": "pt", "info": '{"steps": 3}'}


@needs_torch
def test_state_dict_wrappers_are_unwrapped(tmp_path):
    path = tmp_path / "wrapped.ckpt"
    inner = {"x": torch.arange(6, dtype=torch.float16).reshape(2, 3), "note": "text", "n": 3}
    torch.save({"state_dict": {"state_dict": inner}, "epoch": 4, "global_step": 100}, path)
    sd = load_state_dict(str(path))
    assert list(sd) == ["x"]
    assert sd["x"].dtype == np.float16 and sd["x"].tolist() == [[0, 1, 2], [3, 4, 5]]


@needs_torch
def test_bfloat16_becomes_float32_exactly(tmp_path):
    from safetensors.torch import save_file
    t = torch.randn(5, 3).to(torch.bfloat16)
    save_file({"w": t, "f": torch.ones(2)}, str(tmp_path / "bf.safetensors"))
    torch.save({"w": t}, tmp_path / "bf.ckpt")
    for name in ("bf.safetensors", "bf.ckpt"):
        sd = load_state_dict(str(tmp_path / name))
        assert sd["w"].dtype == np.float32
        assert np.array_equal(sd["w"], t.float().numpy()), name
    assert load_state_dict(str(tmp_path / "bf.safetensors"))["f"].dtype == np.float32


@needs_torch
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"x": Evil(marker)}}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UserError, match="refused: the pickle tries to run code") as err:
        load_state_dict(str(path))
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_truncated_and_corrupt_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_state_dict(str(good), sample_sd())
    data = good.read_bytes()
    for name, blob in (("cut.safetensors", data[: len(data) - 9]), ("head.safetensors", data[:5]),
                       ("junk.safetensors", b"\xff" * 64)):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UserError, match=name):
            load_state_dict(str(tmp_path / name))


@needs_torch
def test_truncated_ckpt(tmp_path):
    ckpt = tmp_path / "good.ckpt"
    save_state_dict(str(ckpt), sample_sd())
    (tmp_path / "cut.ckpt").write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(UserError, match="cut.ckpt"):
        load_state_dict(str(tmp_path / "cut.ckpt"))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_state_dict(str(tmp_path / "nope.safetensors"))
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="unsupported"):
        load_state_dict(str(tmp_path / "x.onnx"))


@pytest.mark.parametrize("ext", [".safetensors"] + TORCH_EXTS[:1])
def test_existing_target_needs_overwrite(tmp_path, ext):
    path = tmp_path / f"out{ext}"
    save_state_dict(str(path), {"a": np.zeros(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        save_state_dict(str(path), {"b": np.ones(3, np.float32)})
    assert path.read_bytes() == before
    save_state_dict(str(path), {"b": np.ones(3, np.float32)}, overwrite=True)
    assert list(load_state_dict(str(path))) == ["b"]
    assert os.listdir(tmp_path) == [path.name]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        save_state_dict(str(tmp_path / "bad.safetensors"), {"a": np.array([object()])})
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError):
        save_state_dict(str(tmp_path / "bad.safetensors"), {1: np.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "m.safetensors"
    save_state_dict(str(path), {"a": np.zeros(2, np.float16)})
    assert load_state_dict(str(path))["a"].dtype == np.float16
