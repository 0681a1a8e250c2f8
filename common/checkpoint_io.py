"""Reading and writing flat state dicts ({name: numpy array}) as .safetensors or PyTorch pickles.

safetensors is the default everywhere. PyTorch pickles (.ckpt/.pt/.pth/.bin) are read only with
`torch.load(weights_only=True)`, so a file that would run code on load is refused, never executed;
torch is imported lazily, only for those files. Writes go to a temporary file in the target
directory, are fsynced and then renamed over the target, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import tempfile
import warnings
from typing import Dict, Optional

import numpy as np

from .errors import UserError

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".ckpt", ".pt", ".pth", ".bin")


def _kind(path: str) -> str:
    low = path.lower()
    if low.endswith(SAFETENSORS_EXT):
        return "safetensors"
    if low.endswith(TORCH_EXT):
        return "torch"
    raise UserError(f"{path}: unsupported checkpoint format (use .safetensors, .ckpt, .pt, .pth or .bin)")


# --------------------------------------------------------------------------- reading

def _safetensors_header(path: str) -> tuple:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path) - 8:
            raise ValueError("header length beyond end of file")
        return json.loads(f.read(n)), 8 + n


def _read_bf16(path: str, info: dict, data_start: int) -> np.ndarray:
    """numpy has no bfloat16: widen to float32 exactly (bf16 is the top half of an fp32)."""
    begin, end = info["data_offsets"]
    bits = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=data_start + begin)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        header, data_start = _safetensors_header(path)
        out = {}
        with safe_open(path, framework="np") as f:
            for key in f.keys():
                if header[key]["dtype"] == "BF16":
                    out[key] = _read_bf16(path, header[key], data_start)
                else:
                    out[key] = f.get_tensor(key)
        return out
    except Exception as e:  # any failure here means the file itself is bad
        raise UserError(f"{path}: not a readable .safetensors file (truncated or corrupt?): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_torch(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading a PyTorch pickle needs torch; convert the file to "
                        f".safetensors on a machine that has it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global outside torch's tensor allow-list (os.system, custom
        # classes, ...). A truncated legacy pickle can end up here too, hence the hedge.
        found = re.search(r"GLOBAL ([\w.]+)|Unsupported operand \d+", str(e))
        detail = f" ({found.group(0)})" if found else ""
        raise UserError(f"{path}: refused: the pickle tries to run code or build objects other "
                        f"than tensors{detail} (or it is corrupt); only plain tensor checkpoints "
                        f"are loaded") from None
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                        f"{msg}") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()                      # numpy has no bfloat16; the widening is exact
            out[key] = t.contiguous().numpy()
    return out


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Read a flat {name: array} state dict from .safetensors or a PyTorch pickle.

    fp16 / fp32 (and integer) tensors keep their dtype; bfloat16 becomes float32 (exact). Pickles:
    top-level {"state_dict": ...} wrappers are unwrapped (repeatedly) and non-tensor entries
    (epoch, global_step, ...) dropped; a pickle that would run code is refused. Missing, truncated
    or corrupt files raise UserError naming the file.
    """
    path = os.fspath(path)
    kind = _kind(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    sd = _load_safetensors(path) if kind == "safetensors" else _load_torch(path)
    if not sd:
        raise UserError(f"{path}: holds no tensors")
    return sd


# --------------------------------------------------------------------------- writing

def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:          # e.g. Windows cannot open directories; the rename is still done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_torch(tmp: str, arrays: Dict[str, np.ndarray], metadata: Optional[dict]) -> None:
    try:
        import torch
    except ImportError:
        raise UserError(f"{tmp}: writing a PyTorch checkpoint needs torch; use .safetensors") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # read-only arrays: torch warns, but only reads them
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    obj = {"state_dict": tensors}
    if metadata:
        obj["metadata"] = metadata          # plain strings: still loadable with weights_only
    with open(tmp, "wb") as f:
        torch.save(obj, f)


def save_state_dict(path: str, sd: Dict[str, np.ndarray], *, overwrite: bool = False,
                    metadata: Optional[dict] = None) -> None:
    """Write `sd` atomically as .safetensors (with `metadata` in its header) or as a PyTorch
    pickle {"state_dict": tensors} (.ckpt/.pt/.pth/.bin; metadata under "metadata").

    The data goes to a temporary file next to `path`, is fsynced, then renamed over `path`.
    An existing `path` without `overwrite` raises UserError and is left untouched.
    """
    path = os.fspath(path)
    kind = _kind(path)
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists (pass overwrite to replace it)")
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise UserError(f"{path}: state dict names must be strings, got {bad[:3]}")
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in sd.items()}  # keeps 0-d arrays 0-d
    meta = None
    if metadata:
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        if kind == "safetensors":
            from safetensors.numpy import save_file
            save_file(arrays, tmp, metadata=meta)
        else:
            _write_torch(tmp, arrays, meta)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    _fsync_dir(directory)
