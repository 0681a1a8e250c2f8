#!/usr/bin/env python
"""The two backends side by side in one run: `--backend cuda` (PyTorch) and `--backend ascend`
(MindSpore, GRAPH_MODE) on the same machine, architecture, weights and batch. Cases:

  train   one DreamBooth training step through the backend Trainer: prior preservation,
          --train_batch_size 2 (2 instance + 2 class images), full UNet fine-tuning, AdamW update
  sample  one image, 20 DPM-Solver++ steps with classifier-free guidance, VAE decode included
  unet    one UNet forward, batch 2 (a CFG pair) through Pipeline.predict
  vae     one VAE decode of one latent through Pipeline.decode
  conv    single convolutions (batch 2), forward and forward+backward: torch.nn.functional.conv2d
          against backends.ascend.layers.Conv2d (config-independent, run once)

Each case runs in its own process (peak RSS does not mix). Times are the best of --reps calls
after warm-up (means are kept in the JSON); `first` is the first call, where MindSpore compiles.
Cases run with OMP_WAIT_POLICY=PASSIVE unless set otherwise: on a CPU shared with other work,
PyTorch's spinning OpenMP threads are 10-40x slower whenever another process holds a core.
`check` is a number both backends should agree on (first loss, mean |output| or |input grad|),
showing the inputs really are identical. Writes benchmarks/results/backends_<device>.{json,md}.

    python benchmarks/bench_backends.py [--configs configs/tiny-v1-inference.yaml ...] [--reps 3]
        [--ascend_native_conv [CONFIG ...]]   # also MindSpore's own CPU convolution (slow: tiny only)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _common import write_results  # noqa: E402  (benchmarks/ is the script's folder)
SUBJECT = os.path.join(ROOT, "assets", "sample_subject")
CONFIGS = ["configs/tiny-v1-inference.yaml", "configs/mid-v1-inference.yaml"]
CASES = ("train", "sample", "unet", "vae", "conv")
# (label, batch, channels, size, kernel, stride): SD's ResBlock / skip / downsample convolutions
CONVS = [("64ch@32x32 3x3", 2, 64, 32, 3, 1), ("320ch@64x64 3x3", 2, 320, 64, 3, 1),
         ("320ch@64x64 1x1", 2, 320, 64, 1, 1), ("320ch@64x64 3x3 stride 2", 2, 320, 64, 3, 2)]
PROMPT, CLASS_PROMPT = "a photo of sks robot", "a photo of a robot"


def _timed(run, reps: int, warm_up: bool = True):
    """(first call s, best s, mean s, last result): the first call, one more warm-up, then reps
    timed calls. The best of them is the headline: the CPU may be shared, and the minimum is the
    least disturbed by others."""
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    if warm_up:
        run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return first, min(times), sum(times) / reps, out


def _native_conv():
    """Make backends.ascend build its Conv2d with MindSpore's own CPU kernel (as before issue 16)."""
    from backends.ascend import layers
    init = layers.Conv2d.__init__

    def native_init(self, *a, **k):
        init(self, *a, **k)
        self.use_matmul = False
    layers.Conv2d.__init__ = native_init


def conv_case(backend: str, reps: int) -> list:
    """CONVS on one backend: rows for forward and forward+backward (input, weight, bias grads)."""
    import numpy as np
    rows = []
    if backend != "cuda":
        import mindspore as ms
        from mindspore import nn, ops

        from backends.ascend.device import setup
        setup(0)
        if backend == "ascend_native_conv":
            _native_conv()
        from backends.ascend.layers import Conv2d

        class Loss(nn.Cell):
            def __init__(self, conv):
                super().__init__()
                self.conv = conv

            def construct(self, x):
                y = self.conv(x)
                return (y * y).sum()
    for label, b, c, size, k, stride in CONVS:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, c, size, size)).astype(np.float32)
        w = (rng.standard_normal((c, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
        bias = rng.standard_normal(c).astype(np.float32)
        if backend == "cuda":
            import torch
            tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, bias))
            conv = lambda: torch.nn.functional.conv2d(tx, tw, tb, stride, k // 2)  # noqa: E731

            def forward():
                with torch.no_grad():
                    return conv().numpy()

            def forward_backward():
                for t in (tx, tw, tb):
                    t.grad = None
                y = conv()
                (y * y).sum().backward()   # a loss that needs the forward
                return tx.grad.numpy()
        else:
            layer = Conv2d(c, c, k, stride, k // 2)
            layer.weight.set_data(ms.Tensor(w))
            layer.bias.set_data(ms.Tensor(bias))
            mx = ms.Tensor(x)
            grad = ops.GradOperation(get_all=True, get_by_list=True)(Loss(layer),
                                                                     ms.ParameterTuple([layer.weight, layer.bias]))
            forward = lambda: layer(mx).asnumpy()  # noqa: E731
            forward_backward = lambda: grad(mx)[0][0].asnumpy()  # noqa: E731
        slow = backend == "ascend_native_conv" and c * size * size > 10 ** 6   # a minute or more per call
        for label_pass, run in (("forward", forward), ("forward+backward", forward_backward)):
            first, best, mean, result = _timed(run, 1 if slow else reps, warm_up=not slow)
            rows.append({"case": "conv", "backend": backend, "shape": f"{label}, batch {b}", "pass": label_pass,
                         "first_seconds": first, "seconds": best, "mean_seconds": mean,
                         "check": float(np.abs(result).mean()),
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return rows


def case(name: str, backend: str, config: str, steps: int, reps: int) -> list:
    """Run one measurement in this process and return its rows of numbers."""
    if name == "conv":
        return conv_case(backend, reps)
    import numpy as np

    from common.arch import load_arch
    from common.formats.init_weights import random_weights
    from common.tokenizer import tokenizer_for

    if backend == "ascend_native_conv":
        _native_conv()
    from backends import load_backend
    be = load_backend(backend.replace("_native_conv", ""))
    arch = load_arch(config)
    weights = random_weights(arch, seed=0)
    size = arch.image_size
    f = arch.vae.downsample_factor
    tok = tokenizer_for(arch.text)
    rng = np.random.default_rng(0)
    out = {"case": name, "backend": backend}
    if name == "train":
        from common.training.data import DreamBoothDataset
        from common.diffusion.schedule import NoiseSchedule
        from common.training.train_args import parse_train_args
        from common.training.train_loop import make_batch, step_inputs
        args = parse_train_args(["--model_config", config, "--instance_data_dir", SUBJECT, "--instance_prompt", PROMPT,
                                 "--class_data_dir", SUBJECT, "--class_prompt", CLASS_PROMPT, "--num_class_images", "1",
                                 "--with_prior_preservation", "True", "--train_text_encoder", "False",
                                 "--train_batch_size", "2", "--image_size", str(size), "--mixed_precision", "no",
                                 "--seed", "0", "--output_path", os.getcwd()])
        ds = DreamBoothDataset(SUBJECT, PROMPT, tok, size, class_dir=SUBJECT, class_prompt=CLASS_PROMPT, seed=0)
        data = next(ds.batches(args.train_batch_size, 0))
        randoms = step_inputs(NoiseSchedule(arch.schedule), args, 0, 0, 1, args.train_batch_size,
                              (arch.vae.embed_dim, size // f, size // f), True)
        batch = make_batch(data, randoms, args.prior_loss_weight)
        trainer = be.Trainer(arch, weights, args)
        losses = []
        # float() waits for the device: the step is timed whole
        run = lambda: losses.append(float(trainer.train_step(batch, 1e-5, True)["loss"]))  # noqa: E731
        unit = f"one training step, 2+2 images (prior preservation), {size}px, full UNet"
    else:
        pipe = be.Pipeline(arch, weights)
        if name == "sample":
            from common.diffusion.generate import SampleSettings, sample_latents
            settings = SampleSettings(sampler="dpm_solver_pp", steps=steps, scale=7.5, height=size, width=size,
                                      seed=0, progress=False)
            ids, neg = tok([PROMPT]), tok([""])
            run = lambda: pipe.decode(sample_latents(pipe, arch, ids, neg, settings, (0, 0)))  # noqa: E731
            unit = f"one {size}px image, {steps} steps, CFG"
        elif name == "unet":
            context = pipe.encode_text(tok([PROMPT, ""]))
            x = rng.standard_normal((2, 4, size // f, size // f)).astype(np.float32)
            run = lambda: pipe.predict(x, 500, context)  # noqa: E731
            unit = f"UNet forward, batch 2, {size // f}px latents"
        else:
            z = rng.standard_normal((1, 4, size // f, size // f)).astype(np.float32)
            run = lambda: pipe.decode(z)  # noqa: E731
            unit = f"VAE decode, one {size}px image"
    first, best, mean, result = _timed(run, reps)
    out.update(first_seconds=first, seconds=best, mean_seconds=mean, unit=unit)
    out["check"] = losses[0] if name == "train" else float(np.abs(result).mean())
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [out]


def _machine() -> dict:
    import mindspore
    import torch
    return {"device": "gpu" if torch.cuda.is_available() else "cpu", "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "mindspore": mindspore.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="architectures to measure")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="cases to run")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after warm-up)")
    p.add_argument("--ascend_native_conv", nargs="*", metavar="CONFIG",
                   help="also run MindSpore with its own CPU convolution (as before issue 16) on these configs "
                        "(none named: the first) and in the conv case; minutes per case beyond the tiny model")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"), help="results folder")
    p.add_argument("--omp_wait_policy", default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                   help="OMP_WAIT_POLICY of the cases (default PASSIVE; ACTIVE is OpenMP's spinning)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.backend, args.configs[0], args.steps, args.reps)))
        return 0

    native = args.configs[:1] if args.ascend_native_conv == [] else args.ascend_native_conv or []
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_WAIT_POLICY=args.omp_wait_policy)
    # (section, backends, cases, config): the conv case does not depend on the architecture
    sections = [(c, ["cuda", "ascend"] + (["ascend_native_conv"] if c in native else []),
                 [n for n in args.cases if n != "conv"], c) for c in args.configs]
    if "conv" in args.cases:
        sections.append(("conv", ["cuda", "ascend"] + (["ascend_native_conv"] if native else []), ["conv"],
                         args.configs[0]))
    results = {}
    # this process imports no framework until the cases are done: a child's peak RSS starts from
    # its parent's, which it inherits through fork/exec
    with tempfile.TemporaryDirectory() as work:   # MindSpore writes rank_0/ logs into the cwd
        for section, backends, cases, config in sections:
            path = config if os.path.isabs(config) else os.path.join(ROOT, config)
            rows = []
            for name in cases:
                for backend in backends:
                    cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--backend", backend,
                           "--configs", path, "--steps", str(args.steps), "--reps", str(args.reps)]
                    load = os.getloadavg()[0]   # others' work on the CPU skews the times
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
                    if proc.returncode:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        return 1
                    rows += [dict(r, load_before=load) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
                    print(section, name, backend, {r.get("shape", "") + " " + r.get("pass", ""): round(r["seconds"], 4)
                                                   for r in rows if r["backend"] == backend and r["case"] == name},
                          flush=True)
            if rows:
                results[section] = {"backends": backends, "results": rows, "ratios": _ratios(rows, backends)}
    report = {**_machine(), "omp_wait_policy": args.omp_wait_policy, "sections": results}
    write_results(os.path.join(args.output, f"backends_{report['device']}"), report, _markdown(report))
    return 0


def _key(row) -> str:
    """A row's name within its section: the case, or for conv the shape and pass."""
    return f"{row['shape']}, {row['pass']}" if row["case"] == "conv" else row["case"]


def _ratios(rows, backends) -> dict:
    """{row key: {backend: time / cuda time}} for the non-cuda backends."""
    by = {(_key(r), r["backend"]): r for r in rows}
    return {k: {b: by[k, b]["seconds"] / by[k, "cuda"]["seconds"] for b in backends if b != "cuda"}
            for k in dict.fromkeys(_key(r) for r in rows)}


def _markdown(report) -> str:
    lines = [f"# PyTorch (`--backend cuda`) vs MindSpore (`--backend ascend`) on {report['device']}", "",
             f"{report['cpu_count']} CPU cores; torch {report['torch']} ({report['torch_threads']} threads), "
             f"mindspore {report['mindspore']} (GRAPH_MODE); fp32; identical weights and inputs; "
             f"OMP_WAIT_POLICY={report['omp_wait_policy']}.",
             "Seconds: best of the timed calls after warm-up (means in the JSON). `first`: the first call, "
             "where MindSpore compiles. Peak RSS: the case's whole process. `check` should agree across "
             "backends. `ascend_native_conv`: MindSpore with its own CPU convolution (before issue 16). "
             "`load`: the 1-minute load average before each backend's run (others' work on the CPU).", ""]
    for section, res in report["sections"].items():
        backends = res["backends"]
        others = [b for b in backends if b != "cuda"]
        by = {(_key(r), r["backend"]): r for r in res["results"]}
        title = "Single convolutions (`conv`)" if section == "conv" else section
        head = (["case"] + [f"{b} s" for b in backends] + [f"{b}/cuda" for b in others] +
                [f"{b} first s" for b in others] + [f"{b} peak MB" for b in backends] +
                ["check (" + " / ".join(backends) + ")", "load"] + ([] if section == "conv" else ["unit"]))
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for key, ratio in res["ratios"].items():
            rows = [by[key, b] for b in backends]
            cells = ([key] + [f"{r['seconds']:.4f}" for r in rows] + [f"{ratio[b]:.2f}" for b in others]
                     + [f"{by[key, b]['first_seconds']:.1f}" for b in others]
                     + [f"{r['peak_rss_mb']:.0f}" for r in rows] + [" / ".join(f"{r['check']:.5g}" for r in rows)]
                     + [" / ".join(f"{r['load_before']:.1f}" for r in rows)]
                     + ([] if section == "conv" else [rows[0]["unit"]]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
