#!/usr/bin/env python
"""The host side of a DreamBooth step: how long the data pipeline takes to hand the trainer one
micro-batch, with camera-size JPEGs (12 MP, as phones take them) — the time a GPU would wait if
loading were on the training thread. Three set-ups side by side, each in its own process (peak
memory apart): every item decoded and resized on the training thread (what the pipeline did
before the cache), the decoded-image cache, and the cache with worker threads ahead of the step.
Writes benchmarks/results/data_<cores>cores.{json,md}.

    python benchmarks/bench_data.py [--megapixels 12] [--size 512] [--batches 40]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _common import write_results  # noqa: E402  (benchmarks/ is the script's folder)

CASES = {"decode_every_item": dict(cache_bytes=0, workers=0),
         "cache": dict(workers=0),
         "cache_2_workers": dict(workers=2)}


def make_images(folder: str, count: int, megapixels: float, seed: int) -> None:
    import numpy as np
    from PIL import Image
    w = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    h = w * 3 // 4
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)   # smooth, photo-like content
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(os.path.join(folder, f"{i:02d}.jpg"), quality=92)


def case(name: str, data: str, size: int, batches: int) -> dict:
    from common.training.data import DreamBoothDataset

    def tok(prompts):
        import numpy as np
        return np.zeros((len(prompts), 77), np.int64)

    ds = DreamBoothDataset(os.path.join(data, "instance"), "p", tok, size, class_dir=os.path.join(data, "class"),
                           class_prompt="c", repeats=40, random_crop=True, flip=True, seed=0, **CASES[name])
    t0 = time.perf_counter()
    done = 0
    for epoch in range(100):
        for _ in ds.batches(2, epoch):
            done += 1
            if done == batches:
                break
        if done == batches:
            break
    seconds = (time.perf_counter() - t0) / batches
    return {"case": name, "ms_per_micro_batch": round(seconds * 1000, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megapixels", type=float, default=12.0, help="size of the JPEGs")
    p.add_argument("--size", type=int, default=512, help="training resolution")
    p.add_argument("--batches", type=int, default=40, help="micro-batches timed (2 instance + 2 class images each)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.data, args.size, args.batches)))
        return 0
    with tempfile.TemporaryDirectory() as data:
        make_images(os.path.join(data, "instance"), 5, args.megapixels, 0)
        make_images(os.path.join(data, "class"), 10, args.megapixels, 1)
        rows = []
        for name in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", name, "--data", data, "--size", str(args.size),
                                  "--batches", str(args.batches)], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    base = rows[0]["ms_per_micro_batch"]
    cores = os.cpu_count()
    result = {"megapixels": args.megapixels, "size": args.size, "batches": args.batches, "cpu_cores": cores,
              "rows": rows, "ratios_vs_decode_every_item": {r["case"]: round(r["ms_per_micro_batch"] / base, 3)
                                                            for r in rows}}
    lines = [f"# Data pipeline, host side ({args.megapixels:g} MP JPEGs -> {args.size}px, batch 2+2 with prior "
             f"preservation, {cores} cores)", "", "| case | ms per micro-batch | peak RSS MB | ratio |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['ms_per_micro_batch']} | {r['peak_rss_mb']} | "
              f"{result['ratios_vs_decode_every_item'][r['case']]} |" for r in rows]
    lines += ["", "Each case times the first batches of a run, decoding included: the cache pays each file "
              "once, then only crops and flips. Workers overlap that with the device step (here, with no "
              "device step, they only add parallel decoding)."]
    write_results(os.path.join(ROOT, "benchmarks", "results", f"data_{cores}cores"), result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
