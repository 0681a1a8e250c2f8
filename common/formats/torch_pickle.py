"""Read `torch.save` files with numpy only: no torch, and no code from the file is ever run.

Two formats, both a pickle whose tensors point at separately stored storages via persistent ids:

* zip (torch >= 1.6): `<folder>/data.pkl` plus one entry `<folder>/data/<key>` per storage, stored
  uncompressed (torch aligns them to 64 bytes with padding in the local header's extra field), and
  an optional `<folder>/byteorder` ("little" when absent). Storages are memory-mapped copy-on-write
  straight out of the file, so a tensor is a view and a 2 GB checkpoint is not read into memory.
* legacy (`_use_new_zipfile_serialization=False`): five pickles back to back (magic number,
  protocol version 1001, sys_info, the object, the sorted storage keys), then for each key an
  int64 element count and the raw little-endian bytes. Storage positions are only known once the
  object pickle has been passed, so it is unpickled twice: once to learn each storage's dtype and
  size, then again with the storages (also memory-mapped) in hand. It is small; the data is not.

Safety: the unpickler's `find_class` hands out only the entries of a fixed allow-list (tensor
rebuild functions, storage type and dtype names, OrderedDict, torch.Size/device); anything else
(`os.system`, `builtins.eval`, a Lightning callback, ...) raises UnsafePickleError before it is
imported. Every callable handed out is an attribute-less object, so a crafted pickle's BUILD
opcode cannot alter it, and tensors are bounds-checked against their storage before any strided
view is made. Tensors come back as numpy arrays (bfloat16 as the raw bits in the `BF16` dtype).
"""
from __future__ import annotations

import io
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

# bfloat16 kept as its raw bits (numpy has no bfloat16); checkpoint_io and every reader share it.
BF16 = np.dtype([("bf16", "<u2")])

_MAGIC = 0x1950A86A20F9469CFC6C        # the legacy format's first pickle
_LEGACY_PROTOCOL = 1001

# Storage classes named in persistent ids -> element dtype ("bf16": uint16 bits).
_STORAGES = {"FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bf16",
             "DoubleStorage": "f8", "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2",
             "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1"}
# torch dtypes (written by _rebuild_tensor_v3, or saved as values) -> element dtype, None: no numpy
# equivalent (still fine as a value, e.g. {"dtype": torch.float8_e4m3fn}).
_DTYPES = {"float32": "f4", "float": "f4", "float16": "f2", "half": "f2", "bfloat16": "bf16",
           "float64": "f8", "double": "f8", "int64": "i8", "long": "i8", "int32": "i4", "int": "i4",
           "int16": "i2", "short": "i2", "int8": "i1", "uint8": "u1", "bool": "?",
           "uint16": "u2", "uint32": "u4", "uint64": "u8", "complex64": None,
           "complex128": None, "float8_e4m3fn": None, "float8_e5m2": None}


class UnsafePickleError(Exception):
    """The pickle names a global outside the allow-list: it would run code or build objects other
    than tensors. Raised before anything is imported or called."""


class _StorageType(str):
    """`torch.FloatStorage` & co. as a plain name; no __dict__, so BUILD cannot change it."""
    __slots__ = ()


class _DType(str):
    """`torch.float16` & co., e.g. "torch.float16"; also what a saved dtype value becomes."""
    __slots__ = ()


class _Storage(NamedTuple):
    data: Optional[np.ndarray]          # 1-d, file byte order; None in the legacy first pass
    kind: str                           # a _STORAGES value
    order: str = "<"                    # the file's byte order, "<" or ">"


def _np_dtype(kind: str, order: str) -> np.dtype:
    return np.dtype(order + ("u2" if kind == "bf16" else kind))


def _ints(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"bad tensor {what} {value!r}")
    return tuple(value)


def _tensor(storage, offset, size, stride, kind: Optional[str] = None) -> Optional[np.ndarray]:
    """A tensor over `storage` (offset/stride in elements), as numpy; `kind` reinterprets an
    untyped (byte) storage. A view when the layout is C-contiguous, else a compact copy."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    if storage.data is None:
        return None
    data = storage.data
    if kind is not None:
        want = _np_dtype(kind, storage.order)
        if storage.kind != "u1" or data.size % want.itemsize:
            raise ValueError("a typed storage given a dtype, or a storage not a whole number "
                             "of elements")
        data = data.view(want)
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise ValueError(f"bad tensor layout: offset {offset!r}, size {size}, stride {stride}")
    if 0 in size:
        x = np.zeros(size, data.dtype)
    else:
        # the last element reached must lie inside the storage, or as_strided would read memory
        # outside it
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size:
            raise ValueError(f"tensor of size {size} at offset {offset} runs past the end of "
                             f"its storage ({data.size} elements)")
        x = np.lib.stride_tricks.as_strided(data[offset:], size,
                                            tuple(s * data.itemsize for s in stride))
        if not x.flags.c_contiguous:    # transposed, expanded, ...: compact, as .contiguous()
            x = np.ascontiguousarray(x)
    if not x.dtype.isnative:            # a big-endian file
        x = x.astype(x.dtype.newbyteorder("="))
    return x.view(BF16) if (kind or storage.kind) == "bf16" else x


def _rebuild_tensor(storage, offset, size, stride):
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
    if metadata:        # conj/neg bits: only complex tensors have them
        raise ValueError(f"tensor metadata {metadata!r} is not supported")
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
    """uint16/32/64 (and other dtypes new to torch 2.x): an untyped storage plus a dtype."""
    if not isinstance(dtype, _DType) or _DTYPES.get(dtype[len("torch."):]) is None:
        raise ValueError(f"tensor dtype {dtype} is not supported")
    if metadata:
        raise ValueError(f"tensor metadata {metadata!r} is not supported")
    return _tensor(storage, offset, size, stride, _DTYPES[dtype[len("torch."):]])


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    """nn.Parameter: its tensor; Python attributes set on it (`state`) are dropped."""
    if data is not None and not isinstance(data, np.ndarray):
        raise ValueError(f"parameter of a {type(data).__name__}, not a tensor")
    return data


def _size(dims=()):
    return _ints(dims, "torch.Size")


def _device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise ValueError(f"bad torch.device({kind!r}, {index!r})")
    return kind if index is None else f"{kind}:{index}"


def _sealed(fn: Callable) -> Any:
    """`fn` as the only method of an instance with neither __dict__ nor slots. A plain function
    handed to the unpickler could have its __defaults__ rewritten by a crafted BUILD opcode, for
    every later load too; this object has nothing to write to."""
    return type(fn.__name__, (), {"__slots__": (), "__call__": staticmethod(fn)})()


_ALLOWED = {("collections", "OrderedDict"): OrderedDict,        # a type: immutable already
            ("torch", "Size"): _sealed(_size), ("torch", "device"): _sealed(_device)}
_ALLOWED.update({("torch._utils", f.__name__): _sealed(f) for f in (
    _rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)})
_ALLOWED[("torch._utils", "_rebuild_parameter_with_state")] = _ALLOWED[
    ("torch._utils", "_rebuild_parameter")]
_ALLOWED.update({(mod, name): _StorageType(name) for name in _STORAGES
                 for mod in ("torch", "torch.storage")})
_ALLOWED.update({("torch", name): _DType("torch." + name) for name in _DTYPES})


class _Unpickler(pickle.Unpickler):
    """Resolves globals from the allow-list only, and storages through `storage(key, kind,
    numel)`."""

    def __init__(self, file, storage: Optional[Callable[[str, str, int], _Storage]] = None):
        super().__init__(file, encoding="utf-8")    # as torch.load: Python 2 era str -> str
        self._storage = storage

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickleError(f"GLOBAL {module}.{name} is not allowed")
        return found

    def persistent_load(self, pid):
        if self._storage is None:
            raise ValueError("a storage reference outside the tensor data")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) \
                or pid[0] not in ("storage", b"storage"):
            raise ValueError(f"unknown persistent id {str(pid)[:80]}")
        _, stype, key, _location, numel, *view = pid      # the location is ignored: all on CPU
        if view and view[0] is not None:
            raise ValueError("storage views (written by torch < 0.4) are not supported")
        if not isinstance(stype, _StorageType) or not isinstance(key, str) \
                or type(numel) is not int or numel < 0:
            raise ValueError(f"bad storage reference {str(pid)[:80]}")
        return self._storage(key, _STORAGES[stype], numel)


def _map(path: str) -> mmap.mmap:
    """Copy-on-write map: arrays over it are writable without ever changing the file."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pkl = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
        if not pkl:
            raise ValueError("a zip file without <folder>/data.pkl, not written by torch.save")
        prefix = pkl[0][:-len("data.pkl")]
        order = "<"
        if prefix + "byteorder" in names:
            mark = zf.read(prefix + "byteorder")
            if mark not in (b"little", b"big"):
                raise ValueError(f"unknown byteorder {mark[:20]!r}")
            order = "<" if mark == b"little" else ">"
        mm = _map(path)
        cache = {}

        def storage(key: str, kind: str, numel: int) -> _Storage:
            if key not in cache:
                dtype = _np_dtype(kind, order)
                try:
                    info = zf.getinfo(f"{prefix}data/{key}")
                except KeyError:
                    raise ValueError(f"storage {key!r} is missing from the archive") from None
                if info.file_size != numel * dtype.itemsize:
                    raise ValueError(f"storage {key!r}: {info.file_size} bytes, expected "
                                     f"{numel} x {dtype.itemsize}")
                if info.compress_type == zipfile.ZIP_STORED:       # always so from torch.save
                    # the data starts after the local header, whose extra field (torch's
                    # alignment padding) may differ from the central directory's
                    head = mm[info.header_offset:info.header_offset + 30]
                    if len(head) < 30 or head[:4] != b"PK\x03\x04":
                        raise ValueError(f"storage {key!r}: bad local zip header")
                    n, m = struct.unpack("<HH", head[26:30])
                    start = info.header_offset + 30 + n + m
                    if start + info.file_size > len(mm):
                        raise ValueError(f"storage {key!r} runs past the end of the file")
                    data = np.frombuffer(mm, dtype, numel, start)
                else:                   # re-zipped with compression: no way around reading it
                    data = np.frombuffer(bytearray(zf.read(info)), dtype)
                cache[key] = _Storage(data, kind, order)
            return cache[key]

        return _Unpickler(io.BytesIO(zf.read(pkl[0])), storage).load()


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        if _Unpickler(f).load() != _MAGIC:
            raise ValueError("not a torch.save file (no magic number)")
        if _Unpickler(f).load() != _LEGACY_PROTOCOL:
            raise ValueError("unknown legacy torch.save protocol version")
        _Unpickler(f).load()                    # sys_info: storages are little-endian regardless
        start = f.tell()
        wanted = {}                             # first pass: key -> (kind, numel)
        _Unpickler(f, lambda key, kind, numel: _Storage(
            None, wanted.setdefault(key, (kind, numel))[0])).load()
        keys = _Unpickler(f).load()
        pos = f.tell()
        if not isinstance(keys, list) or set(keys) != set(wanted):
            raise ValueError("the storage key list does not match the tensors")
        mm = _map(path)
        storages = {}
        for key in keys:                        # [int64 element count][raw bytes], in this order
            kind, numel = wanted[key]
            dtype = _np_dtype(kind, "<")
            if pos + 8 > len(mm) or struct.unpack_from("<q", mm, pos)[0] != numel:
                raise ValueError(f"storage {key!r}: missing or of the wrong size")
            if pos + 8 + numel * dtype.itemsize > len(mm):
                raise ValueError(f"storage {key!r} runs past the end of the file")
            storages[key] = _Storage(np.frombuffer(mm, dtype, numel, pos + 8), kind)
            pos += 8 + numel * dtype.itemsize
        f.seek(start)                           # second pass, with the data
        return _Unpickler(f, lambda key, kind, numel: storages[key]).load()


def load_torch_file(path: str) -> Any:
    """The object a `torch.save` file holds, with tensors as numpy arrays (bfloat16 as BF16 bits;
    parameters as their tensor; torch.Size as a tuple, dtypes and devices as strings). Zip files
    and legacy pickles; tensors are views into a copy-on-write map of the file where their layout
    allows. Raises UnsafePickleError for a pickle that names anything outside the allow-list, and
    ValueError, EOFError, pickle.UnpicklingError or zipfile.BadZipFile for a damaged file."""
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"           # as checkpoint_io.sniff_format decides
    return _load_zip(path) if zipped else _load_legacy(path)
