"""common.formats.torch_pickle: torch.save files read without torch, bit-identical to torch.load, and
pickles that would run code refused without running. torch (when installed) is the oracle."""
import collections
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from common.formats.checkpoint_io import BF16, load_state_dict
from common.errors import UserError
from common.formats.torch_pickle import UnsafePickleError, load_torch_file

try:                    # the oracle and the writer of test files; the refusal tests need neither
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch as the oracle")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ["zip", "legacy"]


def save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return str(path)


def sample(fmt="zip"):
    """Every layout the reader must get right, in a Lightning-style wrapper."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    base[0, :3] = torch.tensor([float("nan"), float("-inf"), -0.0])
    bf = torch.randn(4, 3, generator=g).to(torch.bfloat16)
    sd = collections.OrderedDict([
        ("fp32", base),
        ("fp16", torch.randn(3, 7, generator=g).half()),
        ("bf16", bf),
        ("bf16_t", bf.t()),                               # non-contiguous view of a bf16 storage
        ("int64", torch.arange(-5, 7).reshape(3, 4)),
        ("bool", torch.tensor([[True, False, True]])),
        ("uint16", torch.arange(9).to(torch.uint16)[2:]),   # torch 2.x: _rebuild_tensor_v3
        ("transposed", base.t()),                          # shares base's storage, strided
        ("rows", base[2:]),                                # storage offset, contiguous
        ("column", base[1:, 3]),                           # offset and a stride of 5
        ("expanded", torch.ones(3, 1).expand(3, 4)),       # stride 0
        ("alias", base),                                   # the same tensor twice
        ("scalar", torch.tensor(2.5)),
        ("scalar_bf16", torch.tensor(-1.25, dtype=torch.bfloat16)),
        ("scalar_int", torch.tensor(7)),
        ("empty", torch.zeros(0, 3)),
        ("param", torch.nn.Parameter(torch.randn(2, 2, generator=g))),
    ])
    if fmt == "legacy":
        del sd["uint16"]                    # torch.load itself cannot read it back from legacy
    return {"state_dict": sd, "global_step": 1234, "epoch": 3, "dtype": torch.float16,
            "shape": torch.Size([2, 3]), "pytorch-lightning_version": "1.9.0",
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "lr": 1e-4,
                                  "betas": (0.9, 0.999), "note": None}]}


def assert_same(ours, ref, where="obj"):
    """`ours` (numpy tree) matches torch.load's `ref` exactly, tensors bit for bit."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        assert ours.shape == tuple(ref.shape), where
        if ref.dtype == torch.bfloat16:
            assert ours.dtype == BF16, where
            ref, ours = ref.view(torch.int16).numpy(), ours.view(np.int16)
        else:
            ref = ref.detach().numpy()
        assert ours.dtype == ref.dtype and ours.tobytes() == ref.tobytes(), where
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref), where
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
    elif isinstance(ref, (list, tuple)) and not isinstance(ref, torch.Size):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, torch.Size):
        assert ours == tuple(ref), where
    elif isinstance(ref, torch.dtype):
        assert ours == str(ref), where
    else:
        assert type(ours) is type(ref) and ours == ref, where


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_bit_identical_to_torch_load(tmp_path, fmt):
    path = save(sample(fmt), tmp_path / "m.ckpt", fmt)
    ours = load_torch_file(path)
    assert_same(ours, torch.load(path, weights_only=True))
    sd = ours["state_dict"]
    # contiguous layouts are views into the (copy-on-write) file map, sharing its storages
    assert np.shares_memory(sd["rows"], sd["fp32"]) and sd["alias"] is sd["fp32"]
    assert all(x.flags.c_contiguous for x in sd.values())
    sd["fp32"][...] = 0                                  # writable, and the file unchanged
    assert_same(load_torch_file(path), torch.load(path, weights_only=True))


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep_bf16", [False, True])
def test_load_state_dict_unwraps_and_keeps_bf16_as_before(tmp_path, fmt, keep_bf16):
    path = save(sample(fmt), tmp_path / "m.ckpt", fmt)
    ref = torch.load(path, weights_only=True)["state_dict"]
    sd = load_state_dict(path, keep_bf16=keep_bf16)
    assert list(sd) == list(ref)                        # global_step & co. dropped
    for k, t in ref.items():
        if t.dtype == torch.bfloat16:
            want = (t.contiguous().view(torch.int16).numpy().view(BF16) if keep_bf16
                    else t.float().numpy())
        else:
            want = t.detach().contiguous().numpy()
        assert sd[k].dtype == want.dtype and sd[k].shape == want.shape, k
        assert sd[k].tobytes() == want.tobytes(), k


def rezip(src, dst, folder="renamed", compress=zipfile.ZIP_DEFLATED, edit=None):
    """Copy a torch zip under another top folder, compressed, optionally editing entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress) as zout:
        for info in zin.infolist():
            rest = info.filename.split("/", 1)[1]
            data = zin.read(info)
            zout.writestr(f"{folder}/{rest}", edit(rest, data) if edit else data)
    return str(dst)


@needs_torch
def test_any_folder_name_and_compressed_entries(tmp_path):
    src = save(sample(), tmp_path / "m.pt", "zip")
    path = rezip(src, tmp_path / "re.pt")
    assert_same(load_torch_file(path), torch.load(path, weights_only=True))


@needs_torch
def test_big_endian_byteorder_record(tmp_path):
    src = save({"w": torch.randn(3, 4), "h": torch.randn(5).half()}, tmp_path / "le.pt", "zip")
    sizes = {}
    with zipfile.ZipFile(src) as z:        # which storage holds which item size
        for name in z.namelist():
            if "/data/" in name:
                sizes[name.split("/", 1)[1]] = 4 if z.getinfo(name).file_size == 48 else 2

    def swap(rest, data):
        if rest == "byteorder":
            return b"big"
        if rest in sizes:
            return np.frombuffer(data, f"<u{sizes[rest]}").byteswap().tobytes()
        return data
    path = rezip(src, tmp_path / "be.pt", compress=zipfile.ZIP_STORED, edit=swap)
    assert_same(load_torch_file(path), torch.load(path, weights_only=True))


class Evil:
    """Unpickling this runs a shell command (if the loader were unsafe)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def write_zip(path, pkl):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")


def write_legacy(path, pkl):
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(pkl)
        pickle.dump([], f, protocol=2)


@pytest.mark.parametrize("writer", [write_zip, write_legacy])
def test_code_running_pickles_are_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned.txt"
    payloads = {
        "os_system": pickle.dumps({"state_dict": {"x": Evil(marker)}}, protocol=2),
        "eval": b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode()
                + b"')\ntR.",
        # what old SD checkpoints carry under "callbacks"; refused before anything is imported
        "lightning": b"(dVcallbacks\ncpytorch_lightning.callbacks.model_checkpoint\n"
                     b"ModelCheckpoint\n)Rs.",
    }
    for name, pkl in payloads.items():
        path = tmp_path / f"{name}.ckpt"
        writer(path, pkl)
        with pytest.raises(UnsafePickleError):
            load_torch_file(str(path))
        with pytest.raises(UserError, match="refused: the pickle tries to run code") as err:
            load_state_dict(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    assert "pytorch_lightning" not in sys.modules


def test_allowed_callables_cannot_be_altered(tmp_path):
    # BUILD on an allowed function would rewrite a plain function's __defaults__ for all later
    # loads; the objects handed out have no attributes to write
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    write_zip(tmp_path / "build.pt", pkl)
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_state_dict(str(tmp_path / "build.pt"))


@needs_torch
def test_tensor_outside_its_storage_is_refused(tmp_path):
    # a crafted size/offset must not make a strided view over memory past the storage
    path = save({"w": torch.arange(4.0)}, tmp_path / "m.pt", "zip")
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pkl = z.read(name)
    assert b"K\x04\x85" in pkl                          # size (4,)
    grow = lambda rest, d: d.replace(b"K\x04\x85", b"M\x00\x01\x85") if rest == "data.pkl" else d
    rezip(path, tmp_path / "big.pt", compress=zipfile.ZIP_STORED, edit=grow)     # size (256,)
    with pytest.raises(UserError, match="runs past the end of its storage"):
        load_state_dict(str(tmp_path / "big.pt"))


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_give_one_line_errors(tmp_path, fmt):
    path = save(sample(fmt), tmp_path / "m.ckpt", fmt)
    data = open(path, "rb").read()
    for cut in (3, 60, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.ckpt"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError, match="not a readable PyTorch checkpoint") as err:
            load_state_dict(str(bad))
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


NO_TORCH = r"""
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")

sys.meta_path.insert(0, NoTorch())
try:
    import torch
    raise SystemExit("torch still importable")
except ImportError:
    pass
from common.formats.checkpoint_io import load_state_dict
out = {}
for path in sys.argv[1:]:
    for keep in (False, True):
        sd = load_state_dict(path, keep_bf16=keep)
        out[f"{path}:{keep}"] = {k: [str(v.dtype), list(v.shape), v.tobytes().hex()]
                                 for k, v in sd.items()}
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print(json.dumps(out))
"""


@needs_torch
def test_reads_without_torch(tmp_path):
    paths = [save(sample(fmt), tmp_path / f"{fmt}.ckpt", fmt) for fmt in FORMATS]
    run = subprocess.run([sys.executable, "-c", NO_TORCH, *paths], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    for path in paths:
        for keep in (False, True):
            want = load_state_dict(path, keep_bf16=keep)
            assert got[f"{path}:{keep}"] == {
                k: [str(v.dtype), list(v.shape), v.tobytes().hex()] for k, v in want.items()}
            ref = torch.load(path, weights_only=True)["state_dict"]
            assert want["fp16"].tobytes() == ref["fp16"].numpy().tobytes()
