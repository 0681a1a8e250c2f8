#!/usr/bin/env python
"""Checkpoint conversion at full size: time and peak memory of tools/model_conversion/convert_weights.py
on a full-size SD1.5-architecture fp16 file (about 2 GB), next to its peers, each conversion in its
own process (peak RSS from os.wait4, so peaks do not mix). Writes
benchmarks/results/conversion.{json,md}.

    python benchmarks/bench_conversion.py [--workdir /tmp/bench_conversion] [--no-peers] [--keep]

Cases (the first is MindONE's documented ToonYou command, on random weights):
  ours  pt -> ms          convert_weights.py --model sdv1 --source_version pt   (.safetensors -> MindSpore .ckpt)
  ours  ms -> pt          MindSpore .ckpt -> .safetensors (and -> torch .ckpt)
  ours  pt -> diffusers   .safetensors -> diffusers folder
  peer  pt -> ms          MindONE's I/O: safe_open(framework="pt") -> numpy -> ms.Tensor -> ms.save_checkpoint
  peer  ms -> pt          MindONE's I/O: ms.load_checkpoint -> asnumpy -> torch.save
  peer  pt -> diffusers   diffusers' own single-file converters (convert_ldm_unet_checkpoint, ...)
MindONE's convert_weights.py itself cannot run here: its code is not among the stored references
(only its name lists) and nothing can be downloaded, and it pairs names by line position in those
full-size lists. The two MindONE cases re-enact its I/O calls (the part that decides time and
memory) with our rule-based names; outputs are checked against ours tensor by tensor.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPT = os.path.join(ROOT, "tools", "model_conversion", "convert_weights.py")
CONFIG = "configs/v1-inference.yaml"
RESULTS = os.path.join(ROOT, "benchmarks", "results")


# --------------------------------------------------------------------------- the source file

class Filler:
    """A lazy fp16 tensor: shape and dtype now, values when the writer asks (one at a time), cut
    from a shared pool of random numbers, so a ~1.07 G-parameter file is made in a few seconds
    without ever holding more than one tensor (nor any float32 copy)."""

    def __init__(self, name, shape, pool, dtype="float16"):
        import numpy as np
        self.shape, self.dtype, self.name, self.pool = tuple(shape), np.dtype(dtype), name, pool

    def __array__(self, dtype=None, copy=None):
        import numpy as np
        n = int(np.prod(self.shape, dtype=np.int64))
        if self.dtype != np.float16:                       # the schedule buffers / position ids
            return np.arange(n).astype(self.dtype).reshape(self.shape)
        start = zlib.crc32(self.name.encode()) % (len(self.pool) // 2)
        x = self.pool[start:start + n] if n <= len(self.pool) - start else np.resize(self.pool[start:], n)
        return x.reshape(self.shape)


def make_source(path: str) -> None:
    """Full-size SD1.5 original-layout fp16 .safetensors, like a civitai file (with schedule
    buffers and the int64 position_ids that such files carry)."""
    import numpy as np

    from common.formats import keymap
    from common.arch import load_arch
    from common.formats.checkpoint_io import save_state_dict

    arch = load_arch(CONFIG)
    pool = np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32).astype(np.float16)
    sd = {k: Filler(k, s, pool) for k, s in keymap.ldm_shapes(arch).items()}
    for k in ("betas", "alphas_cumprod", "alphas_cumprod_prev"):
        sd[k] = Filler(k, (1000,), pool, "float32")
    sd[keymap.CLIP_PREFIX + "embeddings.position_ids"] = Filler("ids", (1, 77), pool, "int64")
    save_state_dict(path, sd, overwrite=True)


# --------------------------------------------------------------------------- peers (re-enacted)

PEER_PT_TO_MS = r"""
import sys; sys.path.insert(0, ROOT)
import mindspore as ms, numpy as np
from safetensors import safe_open
from common.arch import load_arch
from common.formats import mindspore_layout as ml
arch = load_arch(CONFIG)
with safe_open(SRC, framework="pt") as f:                    # MindONE: every tensor into memory
    pt = {k: f.get_tensor(k).numpy() for k in f.keys()}
ckpt = []
for e in ml.mindspore_entries(arch):
    if e.optional: continue
    data = pt[e.sources[0]] if len(e.sources) == 1 else np.concatenate([pt[s] for s in e.sources])
    ckpt.append({"name": e.ms, "data": ms.Tensor(data)})
ms.save_checkpoint(ckpt, DST)
"""

PEER_MS_TO_PT = r"""
import sys; sys.path.insert(0, ROOT)
import mindspore as ms, numpy as np, torch
from common.arch import load_arch
from common.formats import mindspore_layout as ml
arch = load_arch(CONFIG)
params = ms.load_checkpoint(SRC)                               # MindONE: load, asnumpy, torch.save
out = {}
for e in ml.mindspore_entries(arch):
    if e.ms not in params: continue
    x = params[e.ms].asnumpy()
    parts = np.split(x, len(e.sources)) if len(e.sources) > 1 else [x]
    for s, p in zip(e.sources, parts):
        out[s] = torch.from_numpy(np.ascontiguousarray(p))
torch.save(out, DST)
"""

PEER_PT_TO_DIFFUSERS = r"""
import sys, os; sys.path.insert(0, ROOT)
from safetensors.torch import load_file, save_file
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                 convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint)
from common.arch import load_arch
from common.formats import keymap
arch = load_arch(CONFIG)
ckpt = load_file(SRC)
for name, sd in (("unet", convert_ldm_unet_checkpoint(ckpt, keymap.diffusers_unet_config(arch))),
                 ("vae", convert_ldm_vae_checkpoint(ckpt, keymap.diffusers_vae_config(arch))),
                 ("text_encoder", convert_ldm_clip_checkpoint(ckpt))):
    os.makedirs(os.path.join(DST, name), exist_ok=True)
    fn = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(DST, name, fn))
"""


# --------------------------------------------------------------------------- measuring

def run_case(cmd) -> dict:
    """Wall time and peak RSS of one command; os.wait4 gives this child's own usage, so peaks of
    earlier cases do not leak in (as they would with RUSAGE_CHILDREN)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "stdout": out.decode().strip().splitlines()[-1][:300] if out.strip() else ""}


def python_snippet(code: str, **consts) -> list:
    head = "".join(f"{k} = {v!r}\n" for k, v in consts.items())
    return [sys.executable, "-c", head + code]


def size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def same_tensors(a: dict, b: dict) -> bool:
    import numpy as np
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes()
        for k in a)


def digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(memoryview(sd[k].reshape(-1).view("uint8")))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- main

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_conversion", help="where the ~10 GB of files go")
    p.add_argument("--no-peers", action="store_true", help="only our conversions")
    p.add_argument("--keep", action="store_true", help="keep the files afterwards")
    p.add_argument("--make-source", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_source:
        make_source(args.make_source)
        return 0

    import numpy as np

    from common.formats import checkpoint_io as cio
    from common.formats import keymap
    from common.formats import mindspore_layout as ml
    from common.arch import load_arch

    os.makedirs(args.workdir, exist_ok=True)
    w = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    for name in os.listdir(args.workdir):
        shutil.rmtree(w(name)) if os.path.isdir(w(name)) else os.remove(w(name))
    src = w("sd15_fp16.safetensors")
    results = {"make_source": run_case([sys.executable, __file__, "--make-source", src])}
    src_mb = os.path.getsize(src) / 2 ** 20
    cw = [sys.executable, SCRIPT]
    cases = [
        ("ours_pt_to_ms", cw + ["--source", src, "--target", w("ours.ckpt"), "--model", "sdv1", "--source_version", "pt"], w("ours.ckpt")),
        ("ours_ms_to_pt", cw + ["-s", w("ours.ckpt"), "-t", w("back.safetensors"), "-m", "sdv1", "-sv", "ms"], w("back.safetensors")),
        ("ours_ms_to_pt_torch_ckpt", cw + ["-s", w("ours.ckpt"), "-t", w("back_torch.ckpt"), "-m", "sdv1", "-sv", "ms"], w("back_torch.ckpt")),
        ("ours_pt_to_diffusers", cw + ["-s", src, "-t", w("ours_diffusers"), "-m", "sdv1", "--to", "diffusers"], w("ours_diffusers")),
    ]
    if not args.no_peers:
        consts = dict(ROOT=ROOT, CONFIG=CONFIG)
        cases += [
            ("peer_mindone_pt_to_ms", python_snippet(PEER_PT_TO_MS, SRC=src, DST=w("peer.ckpt"), **consts), w("peer.ckpt")),
            ("peer_mindone_ms_to_pt", python_snippet(PEER_MS_TO_PT, SRC=w("ours.ckpt"), DST=w("peer_back.ckpt"), **consts), w("peer_back.ckpt")),
            ("peer_diffusers_pt_to_diffusers", python_snippet(PEER_PT_TO_DIFFUSERS, SRC=src, DST=w("peer_diffusers"), **consts), w("peer_diffusers")),
        ]
    for name, cmd, out in cases:
        print(f"{name} ...", flush=True)
        r = run_case(cmd)
        r["output_mb"] = round(size_of(out) / 2 ** 20, 1)
        r["peak_rss_over_source"] = round(r["peak_rss_mb"] / src_mb, 3)
        results[name] = r
        print(f"  {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB ({r['peak_rss_over_source']}x source)", flush=True)

    # correctness of what was measured
    arch = load_arch(CONFIG)
    source = cio.load_state_dict(src)
    canonical = ml.canonical_ldm(source, arch)
    checks = {
        "ms_to_pt_equals_source": same_tensors(cio.load_state_dict(w("back.safetensors")), canonical),
        "ms_to_pt_torch_ckpt_equals_source": same_tensors(cio.load_state_dict(w("back_torch.ckpt")), canonical),
        "ms_names_equal_mindone_list_v1_layout": sorted(cio.load_state_dict(w("ours.ckpt"))) == sorted(ml.mindspore_shapes(arch)),
    }
    ours_diff = cio.load_diffusers_folder(w("ours_diffusers"))
    expected = keymap.ldm_to_diffusers(source, arch)
    checks["diffusers_folder_equals_keymap"] = all(same_tensors(ours_diff[c], expected[c]) for c in keymap.PARTS)
    if not args.no_peers:
        checks["ours_ms_equals_mindone_style"] = same_tensors(cio.load_state_dict(w("ours.ckpt")), cio.load_state_dict(w("peer.ckpt")))
        checks["mindone_style_back_equals_source"] = same_tensors(cio.load_state_dict(w("peer_back.ckpt")), canonical)
        peer_diff = cio.load_diffusers_folder(w("peer_diffusers"))
        # diffusers also copies the source's int64 position_ids buffer, which transformers
        # recomputes (not a weight); everything else must be identical
        peer_diff["text_encoder"].pop("text_model.embeddings.position_ids", None)
        checks["ours_diffusers_equals_diffusers_converters"] = all(same_tensors(ours_diff[c], peer_diff[c]) for c in keymap.PARTS)
        checks["ours_ms_ckpt_byte_identical_to_ms_save_checkpoint"] = open(w("ours.ckpt"), "rb").read() == open(w("peer.ckpt"), "rb").read()
    results["checks"] = checks
    results["source"] = {"path": os.path.basename(src), "mb": round(src_mb, 1), "tensors": len(source),
                         "parameters": int(sum(int(np.prod(x.shape)) for x in source.values())),
                         "sha256_16": digest(source)}
    import platform
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "note": "files just written, so reads hit a warm page cache"}
    del source, canonical, ours_diff, expected
    write_results(results)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if all(checks.values()) else 1


def write_results(results: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "conversion.json"), "w") as f:
        json.dump(results, f, indent=2)
    src = results["source"]
    rows = [k for k in results if k.startswith(("ours_", "peer_"))]
    lines = [f"# Checkpoint conversion, full-size SD1.5 fp16 ({src['mb']:.0f} MB, {src['tensors']} tensors, "
             f"{src['parameters'] / 1e9:.3f} G parameters; {results['machine']['cpus']} CPUs, warm page cache)", "",
             "| case | seconds | peak RSS MB | peak RSS / source size |", "| --- | --- | --- | --- |"]
    for k in rows:
        r = results[k]
        lines.append(f"| {k} | {r['seconds']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_over_source']:.2f} |")
    mk = results["make_source"]
    lines += ["", f"Making the source file itself: {mk['seconds']} s, peak RSS {mk['peak_rss_mb']:.0f} MB.", ""]
    lines.append("Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in results["checks"].items()) + ".")
    lines += ["", "`ours_pt_to_ms` is MindONE's documented ToonYou command (`--model sdv1 --source_version pt`). "
              "Peers: `peer_mindone_*` re-enact MindONE convert_weights.py's I/O (safe_open -> numpy -> "
              "ms.Tensor -> ms.save_checkpoint; ms.load_checkpoint -> asnumpy -> torch.save) with our names, "
              "since its script is not available offline; `peer_diffusers_*` is diffusers' own "
              "single-file converter functions with safetensors load_file/save_file. "
              "Peak RSS includes the memory-mapped source pages that were touched (file-backed, evictable)."]
    with open(os.path.join(RESULTS, "conversion.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
