"""Reading and writing flat state dicts ({name: numpy array}) and diffusers folders.

Formats: `.safetensors`, PyTorch pickles (`.ckpt/.pt/.pth/.bin`), MindSpore `.ckpt` (protobuf) and
diffusers folders (`unet/`, `vae/`, `text_encoder/`, `model_index.json`). `.ckpt` is ambiguous, so
single files are recognised by their first bytes, not their extension: safetensors starts with an
8-byte header length and `{`, a torch zip with `PK`, a legacy torch pickle with 0x80, and a
MindSpore checkpoint with 0x0a (protobuf field 1, length-delimited).

Memory: safetensors and MindSpore files are memory-mapped copy-on-write and every tensor is a view
into the map (torch pickles likewise, zip and legacy alike), and writers stream one
tensor at a time straight from those views. Converting a 2 GB file therefore needs about 2 GB of
(file-backed, evictable) memory, not two or three times that. Casts (`dtype=`) happen per tensor.

MindSpore checkpoints are read and written by a small protobuf codec here (numpy only, the format
is three messages: Checkpoint{repeated Value}, Value{tag, TensorProto}, TensorProto{dims,
tensor_type, tensor_content}); MindSpore itself is not needed and its `load_checkpoint` /
`save_checkpoint` are the oracle in the tests. Unlike MindSpore's own loader (which reads the file
into memory, parses it into a second copy and joins slices into a third) this keeps one mapping.

bfloat16: numpy has no such type. By default bf16 tensors are widened to float32 (exact). With
`keep_bf16=True` they stay 2 bytes wide as arrays of the structured dtype `BF16` (the raw bits
under the field "bf16"), which writers store as bf16 again; `cast_array` converts.

PyTorch pickles are read without torch by `common.formats.torch_pickle`, whose unpickler builds nothing but
tensors and plain data, so a file that would run code is refused, never executed; only writing
them needs torch. Writes go to a temporary file next to the target, are fsynced and renamed over
it; an existing target needs `overwrite`.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from common.atomic import atomic_path
from common.errors import UserError
from common.formats.torch_pickle import BF16, UnsafePickleError, load_torch_file  # BF16: bfloat16 as raw bits

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".ckpt", ".pt", ".pth", ".bin")

DTYPES = ("fp16", "fp32", "bf16")

_ST_CODES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
             np.dtype(np.int8): "I8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
             np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
             np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL",
             BF16: "BF16"}
_ST_DTYPES = {v: k for k, v in _ST_CODES.items()}
_MS_CODES = {np.dtype(np.float16): "Float16", np.dtype(np.float32): "Float32",
             np.dtype(np.float64): "Float64", np.dtype(np.int8): "Int8", np.dtype(np.int16): "Int16",
             np.dtype(np.int32): "Int32", np.dtype(np.int64): "Int64", np.dtype(np.uint8): "UInt8",
             np.dtype(np.uint16): "UInt16", np.dtype(np.uint32): "UInt32",
             np.dtype(np.uint64): "UInt64", np.dtype(np.bool_): "Bool", BF16: "BFloat16"}
_MS_DTYPES = {v: k for k, v in _MS_CODES.items()}
_MS_SLICE_BYTES = 512 * 1024 * 1024      # MindSpore splits tensors above this into several Values


# --------------------------------------------------------------------------- dtypes

def is_float(x) -> bool:
    """Floating point (incl. kept bfloat16): what --dtype casts; integers and bools never change."""
    return x.dtype.kind == "f" or x.dtype == BF16


def _bf16_to_f32(x: np.ndarray) -> np.ndarray:
    y = x.view("<u2").astype(np.uint32)
    np.left_shift(y, np.uint32(16), out=y)     # in place: `<<` on a 0-d array gives an unviewable scalar
    return y.view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch and MindSpore do; NaNs stay (quiet) NaNs."""
    x = np.asarray(x, np.float32)
    bits = np.ascontiguousarray(x).reshape(x.shape).view(np.uint32)
    out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out.view(BF16)


def cast_array(x: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    """`x` in "fp16", "fp32" or "bf16" (BF16 bits); None or a non-float array: unchanged. No copy
    when the dtype already matches."""
    if dtype is None or not is_float(x):
        return x
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if dtype == "bf16":
        return x if x.dtype == BF16 else _f32_to_bf16(np.asarray(x, np.float32))
    wide = _bf16_to_f32(x) if x.dtype == BF16 else x
    return wide.astype(np.float16 if dtype == "fp16" else np.float32, copy=False)


def dtype_name(x) -> str:
    """fp16 / fp32 / bf16 / the numpy name, for messages and configs."""
    return {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32", BF16: "bf16"}.get(
        x.dtype, x.dtype.name)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# --------------------------------------------------------------------------- format detection

def _kind(path: str) -> str:
    low = path.lower()
    if low.endswith(SAFETENSORS_EXT):
        return "safetensors"
    if low.endswith(TORCH_EXT):
        return "torch"
    raise UserError(f"{path}: unsupported checkpoint format (use .safetensors, .ckpt, .pt, .pth or .bin)")


def sniff_format(path: str) -> str:
    """"safetensors", "torch" (zip or legacy pickle), "mindspore", or "unknown", from the first
    bytes of a file (a .ckpt may be a torch pickle or a MindSpore protobuf)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= os.path.getsize(path) - 8:
            return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if head[:1] == b"\x0a":
        return "mindspore"
    return "unknown"


def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "model_index.json"))
        or any(os.path.isdir(os.path.join(path, c)) for c in DIFFUSERS_LAYOUT))


def checkpoint_format(path: str) -> str:
    """What `path` holds: "diffusers" (a folder), "safetensors", "torch" or "mindspore".
    The names of a "mindspore" file are MindONE's layout (see common.formats.mindspore_layout)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_diffusers_folder(path):
            return "diffusers"
        raise UserError(f"{path}: a folder, but not a diffusers model folder (no model_index.json, "
                        f"unet/, vae/ or text_encoder/)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    kind = _kind(path)
    if kind == "safetensors":
        return kind
    found = sniff_format(path)
    if found == "unknown":
        raise UserError(f"{path}: neither a PyTorch, MindSpore nor safetensors checkpoint "
                        f"(unrecognised first bytes; truncated or corrupt?)")
    return found


# --------------------------------------------------------------------------- reading

def _map_file(path: str) -> mmap.mmap:
    """Copy-on-write map of a whole file: views are writable but never change the file."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _safetensors_header(path: str) -> tuple:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path) - 8:
            raise ValueError("header length beyond end of file")
        return json.loads(f.read(n)), 8 + n


def safetensors_metadata(path: str) -> Dict[str, str]:
    """The `__metadata__` strings of a .safetensors file ({} for other formats or none)."""
    if not os.path.isfile(path) or sniff_format(path) != "safetensors":
        return {}
    try:
        header, _ = _safetensors_header(path)
    except (ValueError, OSError):
        return {}                  # reading the tensors reports what is wrong with the file
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _load_safetensors(path: str, keep_bf16: bool) -> Dict[str, np.ndarray]:
    try:
        header, start = _safetensors_header(path)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        size = os.path.getsize(path)
        buf = _map_file(path) if size > start else b""
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"tensor {key}: unsupported dtype {info.get('dtype')}")
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            count = int(np.prod(shape, dtype=np.int64))
            if end - begin != count * dtype.itemsize or begin < 0:
                raise ValueError(f"tensor {key}: {end - begin} bytes for shape {shape}")
            if start + end > size:
                raise ValueError(f"tensor {key} extends beyond the end of the file")
            x = np.frombuffer(buf, dtype, count, start + begin).reshape(shape) if count else \
                np.zeros(shape, dtype)
            out[key] = x if keep_bf16 or dtype != BF16 else _bf16_to_f32(x)
        return out
    except (ValueError, KeyError, TypeError, OSError) as e:   # the file itself is bad
        raise UserError(f"{path}: not a readable .safetensors file (truncated or corrupt?): "
                        f"{_first_line(e)}") from None


def load_torch_object(path: str) -> Any:
    """The object a PyTorch pickle holds (dicts, lists, strings, numbers; tensors as numpy arrays,
    bf16 as BF16 bits), read by common.formats.torch_pickle without torch and without running code.
    A pickle that would run code, or a damaged file, is a UserError naming the file."""
    try:
        return load_torch_file(path)
    except UnsafePickleError as e:
        raise UserError(f"{path}: refused: the pickle tries to run code or build objects other "
                        f"than tensors ({e}); only plain tensor checkpoints are loaded") from None
    except Exception as e:      # EOFError, UnpicklingError, BadZipFile, ValueError, ...
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                        f"{_first_line(e)}") from None


def _load_torch(path: str, keep_bf16: bool) -> Dict[str, np.ndarray]:
    """A PyTorch pickle (zip or legacy) read by common.formats.torch_pickle, never by torch: no torch
    needed (Ascend installs), no code from the file run, storages memory-mapped. Measured against
    torch.load(weights_only=True, mmap=True) on a 519 MB fp16 file of 1231 tensors: zip 0.05 s vs
    0.1 s with torch already imported (same peak RSS), 0.2 s / 115 MB peak RSS vs 2 s / 786 MB in a
    fresh process (importing torch); legacy 0.04 s vs 0.5 s and +460 MB (torch reads it in).

    The one place a pickle's object becomes a state dict: {"state_dict": ...} wrappers are
    unwrapped (repeatedly), entries that are not named tensors (epoch, global_step, ...) dropped."""
    obj = load_torch_object(path)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    # bf16 arrives as BF16 bits; widening to float32 is exact (torch's .float() gives the same)
    return {key: x if keep_bf16 or x.dtype != BF16 else _bf16_to_f32(x)
            for key, x in obj.items() if isinstance(key, str) and isinstance(x, np.ndarray)}


# MindSpore protobuf: wire types 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.

def _varint(buf, pos: int, end: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, pos: int, end: int) -> Iterator[Tuple[int, int, Any]]:
    """(field number, wire type, value) of one message; a length-delimited value is (start, end)."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            value = None
        else:
            raise ValueError(f"bad protobuf wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end of the file")
        yield field, wire, value


def _ms_tensor(buf, start: int, end: int) -> Tuple[List[int], str, Tuple[int, int]]:
    dims: List[int] = []
    dtype, content = None, (start, start)
    for field, wire, value in _fields(buf, start, end):
        if field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:                 # packed dims (not what MindSpore writes)
            p, e = value
            while p < e:
                d, p = _varint(buf, p, e)
                dims.append(d)
        elif field == 2:
            dtype = bytes(buf[value[0]:value[1]]).decode()
        elif field == 3:
            content = value
    if dtype is None:
        raise ValueError("tensor without tensor_type")
    return dims, dtype, content


def _load_mindspore(path: str, keep_bf16: bool,
                    strings: Optional[Dict[str, str]] = None) -> Dict[str, np.ndarray]:
    """The tensors of a MindSpore .ckpt; `strings`, when given, receives its append_dict strings
    (stored by MindSpore as UTF-32 text)."""
    try:
        buf = _map_file(path)
        end = len(buf)
        if end >= 17 and buf[end - 17:end - 10] == b"crc_num":     # crc_check=True trailer
            end -= 17
        records: List[Tuple[str, List[int], str, List[Tuple[int, int]]]] = []
        for field, wire, value in _fields(buf, 0, end):
            if field != 1 or wire != 2:
                raise ValueError(f"unexpected protobuf field {field}")
            vstart, vend = value
            tag, tensor = None, None
            for f2, w2, v2 in _fields(buf, vstart, vend):
                if f2 == 1:
                    tag = bytes(buf[v2[0]:v2[1]]).decode()
                elif f2 == 2:
                    tensor = _ms_tensor(buf, *v2)
                elif f2 == 3:
                    raise ValueError(f"{tag}: MapParameter entries are not supported")
            if tag is None or tensor is None:
                raise ValueError("checkpoint value without name or tensor")
            dims, dtype, content = tensor
            if records and records[-1][0] == tag:          # a large tensor saved in slices
                records[-1][3].append(content)
            else:
                records.append((tag, dims, dtype, [content]))
        out = {}
        for tag, dims, dtype_str, slices in records:
            if dtype_str == "str":                         # append_dict strings: not tensors
                if strings is not None:
                    strings[tag] = b"".join(bytes(buf[s:e]) for s, e in slices).decode("utf-32-le")
                continue
            dtype = _MS_DTYPES.get(dtype_str)
            if dtype is None:
                raise ValueError(f"tensor {tag}: unsupported tensor_type {dtype_str}")
            nbytes = sum(e - s for s, e in slices)
            if dims == [0] and nbytes == dtype.itemsize:     # MindSpore's spelling of a scalar
                dims = []
            shape = tuple(dims)
            count = int(np.prod(shape, dtype=np.int64))
            if nbytes != count * dtype.itemsize:
                raise ValueError(f"tensor {tag}: {nbytes} bytes for shape {shape} {dtype_str}")
            if len(slices) == 1:
                x = np.frombuffer(buf, dtype, count, slices[0][0]) if count else np.zeros(0, dtype)
            else:
                x = np.frombuffer(b"".join(buf[s:e] for s, e in slices), dtype)
            x = x.reshape(shape)
            out[tag] = x if keep_bf16 or dtype != BF16 else _bf16_to_f32(x)
        return out
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable MindSpore checkpoint (truncated or corrupt?): "
                        f"{_first_line(e)}") from None


def load_state_dict(path: str, *, keep_bf16: bool = False) -> Dict[str, np.ndarray]:
    """Read a flat {name: array} state dict from .safetensors, a PyTorch pickle or a MindSpore
    .ckpt (the format is taken from the file's first bytes; names are returned as stored).

    fp16 / fp32 (and integer) tensors keep their dtype; bfloat16 becomes float32 (exact) unless
    `keep_bf16`, which returns BF16 arrays. Arrays are views into a copy-on-write memory map where
    the format allows. Pickles: top-level {"state_dict": ...} wrappers are unwrapped (repeatedly)
    and non-tensor entries (epoch, global_step, ...) dropped; a pickle that would run code is
    refused. Missing, truncated or corrupt files raise UserError naming the file.
    """
    path = os.fspath(path)
    kind = _kind(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if kind != "safetensors":
        kind = sniff_format(path)
        if kind == "unknown":
            raise UserError(f"{path}: neither a PyTorch, MindSpore nor safetensors checkpoint "
                            f"(unrecognised first bytes; truncated or corrupt?)")
    reader = {"safetensors": _load_safetensors, "torch": _load_torch, "mindspore": _load_mindspore}
    sd = reader[kind](path, keep_bf16)
    if not sd:
        raise UserError(f"{path}: holds no tensors")
    return sd


# --------------------------------------------------------------------------- writing

def _plan(sd: Mapping[str, Any], dtype: Optional[str], path: str) -> List[Tuple[str, Any, Tuple[int, ...], np.dtype]]:
    """(name, value, shape, stored dtype) per tensor, read from shapes and dtypes only: values may
    be lazy objects with .shape, .dtype and __array__ (made when written, one at a time)."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    target = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32), "bf16": BF16}.get(dtype)
    plan = []
    for name, value in sd.items():
        if not isinstance(name, str):
            raise UserError(f"{path}: state dict names must be strings, got {name!r}")
        if not hasattr(value, "dtype"):
            value = np.asarray(value)
        stored = target if target is not None and is_float(value) else np.dtype(value.dtype)
        if stored not in _ST_CODES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {stored}")
        plan.append((name, value, tuple(int(d) for d in np.shape(value)), stored))
    return plan


def _materialise(value, stored: np.dtype) -> np.ndarray:
    x = np.asarray(value)
    x = cast_array(x, {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32", BF16: "bf16"}[stored]) \
        if is_float(x) and x.dtype != stored else x
    return np.ascontiguousarray(x).reshape(x.shape)     # ascontiguousarray makes 0-d arrays 1-d


def _raw(x: np.ndarray) -> np.ndarray:
    """The bytes of a contiguous array as a flat uint8 view (works for 0-d and BF16 too)."""
    return x.reshape(-1).view(np.uint8)


def _write_safetensors(f, plan, metadata: Optional[Dict[str, str]]) -> None:
    # Larger items first keeps every tensor aligned to its item size (the data starts 8-aligned).
    plan = sorted(plan, key=lambda p: (-p[3].itemsize, p[0]))
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, _, shape, stored in plan:
        n = int(np.prod(shape, dtype=np.int64)) * stored.itemsize
        header[name] = {"dtype": _ST_CODES[stored], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, value, shape, stored in plan:
        f.write(_raw(_materialise(value, stored)))


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


def _write_mindspore(f, plan) -> None:
    """What mindspore.save_checkpoint writes: one Checkpoint{value: Value} message per tensor
    (per 512 MiB slice of a larger one), concatenated; dims unpacked, no dims for a scalar."""
    for name, value, shape, stored in plan:
        x = _raw(_materialise(value, stored))
        step = max(stored.itemsize, _MS_SLICE_BYTES // stored.itemsize * stored.itemsize)
        for s in range(0, max(len(x), 1), step):
            chunk = x[s:s + step]
            head = b"".join(b"\x08" + _pb_varint(d) for d in shape)
            head += _pb_bytes(2, _MS_CODES[stored].encode()) + b"\x1a" + _pb_varint(len(chunk))
            tensor_len = len(head) + len(chunk)
            val = _pb_bytes(1, name.encode()) + b"\x12" + _pb_varint(tensor_len) + head
            f.write(b"\x0a" + _pb_varint(len(val) + len(chunk)) + val)
            f.write(chunk)


def _write_torch(f, plan, metadata: Optional[Dict[str, str]]) -> None:
    try:
        import torch
    except ImportError:
        raise UserError("writing a PyTorch checkpoint needs torch; use .safetensors") from None
    tensors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # read-only arrays: torch warns, but only reads them
        for name, value, shape, stored in plan:
            x = _materialise(value, stored)
            if stored == BF16:
                tensors[name] = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
            else:
                tensors[name] = torch.from_numpy(x)
    obj = {"state_dict": tensors}
    if metadata:
        obj["metadata"] = metadata          # plain strings: still loadable with weights_only
    torch.save(obj, f)


def save_state_dict(path: str, sd: Mapping[str, Any], *, overwrite: bool = False,
                    metadata: Optional[dict] = None, dtype: Optional[str] = None,
                    format: Optional[str] = None) -> None:
    """Write `sd` atomically as .safetensors (with `metadata` in its header), a PyTorch pickle
    {"state_dict": tensors} (.ckpt/.pt/.pth/.bin; metadata under "metadata") or, with
    `format="mindspore"`, a MindSpore checkpoint (any extension; metadata is not stored).

    `dtype` ("fp16"/"fp32"/"bf16") casts floating tensors as they are written, one at a time.
    safetensors and MindSpore files are streamed from the arrays without copies. The data goes to
    a temporary file next to `path`, is fsynced, then renamed over `path`. An existing `path`
    without `overwrite` raises UserError and is left untouched.
    """
    path = os.fspath(path)
    kind = format or _kind(path)
    if kind not in ("safetensors", "torch", "mindspore"):
        raise UserError(f"{path}: unknown checkpoint format {kind!r}")
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"{path} already exists (pass overwrite to replace it)")
    plan = _plan(sd, dtype, path)
    meta = None
    if metadata:
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    need = sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for _, _, shape, dt in plan)
    with atomic_path(path, overwrite, need=need) as tmp, open(tmp, "wb") as f:
        if kind == "safetensors":
            _write_safetensors(f, plan, meta)
        elif kind == "mindspore":
            _write_mindspore(f, plan)
        else:
            _write_torch(f, plan, meta)


def load_mindspore_ckpt(path: str, *, keep_bf16: bool = True) -> Dict[str, np.ndarray]:
    """A MindSpore .ckpt as {name: array} (MindSpore names, dtypes as stored; bf16 kept by
    default). Refuses files that are not MindSpore checkpoints."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if sniff_format(path) != "mindspore":
        raise UserError(f"{path}: not a MindSpore checkpoint (it looks like "
                        f"{sniff_format(path)}); check --source_version")
    sd = _load_mindspore(path, keep_bf16)
    if not sd:
        raise UserError(f"{path}: holds no tensors")
    return sd


def load_mindspore_ckpt_with_strings(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """A MindSpore .ckpt's tensors (bf16 widened to float32) and the strings MindSpore's
    `append_dict` stored beside them (e.g. MindONE's textual-inversion `placeholder_token`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    strings: Dict[str, str] = {}
    return _load_mindspore(path, False, strings), strings


def save_mindspore_ckpt(path: str, sd: Mapping[str, Any], *, overwrite: bool = False,
                        dtype: Optional[str] = None) -> None:
    """`save_state_dict(..., format="mindspore")`: a file mindspore.load_checkpoint reads."""
    save_state_dict(path, sd, overwrite=overwrite, dtype=dtype, format="mindspore")


# --------------------------------------------------------------------------- diffusers folders

# component -> weight file names tried when reading (the first is written).
DIFFUSERS_LAYOUT = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
                     "pytorch_model.fp16.bin"),
}
# Tensors of the original file that diffusers has no place for (SD2's unused last OpenCLIP block,
# text_projection, logit_scale): kept beside the components so the way back is complete.
EXTRAS_FILE = "ldm_extras.safetensors"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def load_diffusers_folder(path: str, *, keep_bf16: bool = False) -> Dict[str, Dict[str, np.ndarray]]:
    """{component: {diffusers name: array}} for the unet / vae / text_encoder found in a diffusers
    folder (safetensors or .bin, plain or .fp16 variant), plus "extras" if this project wrote
    them (see EXTRAS_FILE). `folder_prediction_type` reads the scheduler's prediction type."""
    path = os.fspath(path)
    if not is_diffusers_folder(path):
        raise UserError(f"{path}: not a diffusers model folder (no model_index.json, unet/, vae/ "
                        f"or text_encoder/)")
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for component, names in DIFFUSERS_LAYOUT.items():
        folder = os.path.join(path, component)
        if not os.path.isdir(folder):
            continue
        found = [n for n in names if os.path.isfile(os.path.join(folder, n))]
        if not found:
            sharded = [n for n in os.listdir(folder) if n.endswith(".index.json")]
            what = f"sharded weights ({sharded[0]}) are not supported" if sharded else \
                f"no weight file ({' or '.join(names)})"
            raise UserError(f"{folder}: {what}")
        out[component] = load_state_dict(os.path.join(folder, found[0]), keep_bf16=keep_bf16)
    extras = os.path.join(path, EXTRAS_FILE)
    if os.path.isfile(extras):
        out["extras"] = load_state_dict(extras, keep_bf16=keep_bf16)
    if not out:
        raise UserError(f"{path}: diffusers folder without unet, vae or text_encoder weights")
    return out


def folder_prediction_type(path: str) -> Optional[str]:
    """"epsilon" / "v_prediction" from a diffusers folder's scheduler config, or None."""
    cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    return _read_json(cfg).get("prediction_type") if os.path.isfile(cfg) else None


def _diffusers_configs(arch, parts: Mapping[str, Mapping[str, Any]]) -> Dict[str, dict]:
    from common.formats import keymap

    def torch_dtype(tensors):
        floats = [dtype_name(x) for x in tensors.values() if is_float(x)]
        return {"fp16": "float16", "bf16": "bfloat16"}.get(floats[0] if floats else "", "float32")

    configs: Dict[str, dict] = {}
    if "unet" in parts:
        configs["unet"] = {"_class_name": "UNet2DConditionModel", **keymap.diffusers_unet_config(arch)}
    if "vae" in parts:
        configs["vae"] = {"_class_name": "AutoencoderKL", **keymap.diffusers_vae_config(arch)}
    if "text_encoder" in parts:
        configs["text_encoder"] = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                   "torch_dtype": torch_dtype(parts["text_encoder"]),
                                   **keymap.clip_text_config(arch)}
    s = arch.schedule
    configs["scheduler"] = {
        "_class_name": "DDIMScheduler", "num_train_timesteps": s.timesteps,
        "beta_start": s.linear_start, "beta_end": s.linear_end,
        # LDM's "linear" schedule is linear in sqrt(beta): diffusers calls that "scaled_linear".
        "beta_schedule": "scaled_linear" if s.beta_schedule == "linear" else s.beta_schedule,
        "prediction_type": "v_prediction" if s.parameterization == "v" else "epsilon",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    return configs


def save_diffusers_folder(path: str, parts: Mapping[str, Mapping[str, Any]], arch, *,
                          overwrite: bool = False, dtype: Optional[str] = None) -> None:
    """Write {component: {diffusers name: array}} (from keymap.ldm_to_diffusers) as a diffusers
    folder: <component>/<weights>.safetensors with config.json files generated from `arch`, a
    scheduler config and model_index.json; "extras" go to ldm_extras.safetensors. There is no
    tokenizer/ (pass one to the pipeline). Written to a temporary folder and renamed; an existing
    `path` needs `overwrite`."""
    path = os.fspath(path)
    unknown = [c for c in parts if c not in DIFFUSERS_LAYOUT and c != "extras"]
    if unknown:
        raise UserError(f"unknown diffusers component(s) {unknown}")
    configs = _diffusers_configs(arch, parts)
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "tokenizer": [None, None], "scheduler": ["diffusers", "DDIMScheduler"]}
    classes = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"]}
    with atomic_path(path, overwrite, folder=True) as tmp:
        for component, tensors in parts.items():
            if component == "extras":
                if tensors:
                    save_state_dict(os.path.join(tmp, EXTRAS_FILE), tensors, dtype=dtype)
                continue
            os.makedirs(os.path.join(tmp, component))
            save_state_dict(os.path.join(tmp, component, DIFFUSERS_LAYOUT[component][0]), tensors,
                            dtype=dtype)
            index[component] = classes[component]
        for component, cfg in configs.items():
            if dtype and component == "text_encoder":
                cfg["torch_dtype"] = {"fp16": "float16", "bf16": "bfloat16"}.get(dtype, "float32")
            folder = os.path.join(tmp, component)
            os.makedirs(folder, exist_ok=True)
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            with open(os.path.join(folder, name), "w") as f:
                json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
