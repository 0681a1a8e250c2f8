#!/usr/bin/env python
"""PyTorch backend vs its peer, side by side in one run: sampling against diffusers'
StableDiffusionPipeline and a training step against diffusers' train_dreambooth.py step, on the
same components, weights and batch. Reports time ratios and peak memory (each case in its own
process, so peaks do not mix) and writes benchmarks/results/cuda_<device>.{json,md}.

    python benchmarks/bench_cuda.py [--config configs/tiny-v1-inference.yaml] [--steps 20]

On a machine without a GPU this measures the CPU path; run it on a GPU box for GPU numbers.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def case(name: str, config: str, steps: int, size: int) -> dict:
    """Run one measurement in this process and return its numbers."""
    import numpy as np
    import torch

    from common.arch import load_arch
    from common.formats.init_weights import random_weights

    torch.manual_seed(0)
    arch = load_arch(config)
    weights = random_weights(arch, seed=0)
    size = size or arch.image_size
    out = {"case": name}
    if name in ("sample_ours", "sample_diffusers"):
        from _common import sampling_run
        run, _ = sampling_run(name.split("_", 1)[1], arch, weights, steps, size)
        run()  # warm-up
        t0 = time.perf_counter()
        run()
        out["seconds"] = time.perf_counter() - t0
        out["unit"] = f"one {size}px image, {steps} steps, CFG"
    else:
        from common.training.train_args import parse_train_args
        args = parse_train_args(["--instance_data_dir", "x", "--instance_prompt", "x", "--with_prior_preservation", "False",
                                 "--train_text_encoder", "False", "--image_size", str(size), "--seed", "0"])
        b = 1
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, (b, 3, size, size)).astype(np.float32)
        from common.diffusion.schedule import NoiseSchedule
        from common.tokenizer import tokenizer_for
        ids = tokenizer_for(arch.text)(["a photo of sks robot"] * b)
        f = arch.vae.downsample_factor
        lat = (b, arch.vae.embed_dim, size // f, size // f)
        if name == "train_ours":
            from backends.cuda import Trainer
            trainer = Trainer(arch, weights, args)
            t = rng.integers(0, 1000, b)
            a_, b_ = NoiseSchedule(arch.schedule).coefficients(t)
            batch = dict(images=images, ids=ids, n_instance=b, prior_loss_weight=0.0, timesteps=t, coef_a=a_, coef_b=b_,
                         noise=rng.standard_normal(lat).astype(np.float32),
                         latent_noise=rng.standard_normal(lat).astype(np.float32), loss_weights=np.ones(b, np.float32))
            run = lambda: float(trainer.train_step(batch, 1e-5, True)["loss"])  # noqa: E731  (waits for the device)
        else:
            from diffusers import DDPMScheduler

            from backends.cuda.models import load_models
            unet, vae, text, _ = load_models(arch, weights)
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            unet.to(dev).train()
            vae.to(dev).requires_grad_(False)
            text.to(dev).requires_grad_(False)
            opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
            sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
            x = torch.from_numpy(images).to(dev)
            tid = torch.from_numpy(ids).to(dev)

            def run():  # the step of diffusers' examples/dreambooth/train_dreambooth.py
                with torch.no_grad():
                    latents = vae.encode(x).latent_dist.sample() * arch.scale_factor
                noise = torch.randn_like(latents)
                ts = torch.randint(0, 1000, (b,), device=dev)
                noisy = sched.add_noise(latents, noise, ts)
                with torch.no_grad():
                    ctx = text(tid)[0]
                pred = unet(noisy, ts, ctx).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        run()
        run()
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        out["seconds"] = (time.perf_counter() - t0) / reps
        out["unit"] = f"one training step, batch 1, {size}px, full UNet"
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-v1-inference.yaml", help="architecture to measure")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--size", type=int, default=0, help="image size (default: the model's)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"), help="results folder")
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.config, args.steps, args.size)))
        return 0
    results = []
    for name in ("sample_ours", "sample_diffusers", "train_ours", "train_diffusers"):
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--config", args.config, "--steps",
                               str(args.steps), "--size", str(args.size)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1])
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    by = {r["case"]: r for r in results}
    ratios = {"sample_time_ours_over_diffusers": by["sample_ours"]["seconds"] / by["sample_diffusers"]["seconds"],
              "train_time_ours_over_diffusers": by["train_ours"]["seconds"] / by["train_diffusers"]["seconds"]}
    report = {"device": device, "config": args.config, "torch": torch.__version__, "results": results, "ratios": ratios}
    os.makedirs(args.output, exist_ok=True)
    tag = "cpu" if device == "cpu" else device.replace(" ", "_")
    with open(os.path.join(args.output, f"cuda_{tag}.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# PyTorch backend vs diffusers ({device}, {args.config})", "",
             "| case | seconds | peak RSS MB | unit |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['seconds']:.4f} | {r['peak_rss_mb']:.0f} | {r['unit']} |" for r in results]
    lines += ["", f"ratios (ours / diffusers; < 1 is faster): sampling {ratios['sample_time_ours_over_diffusers']:.3f}, "
                  f"training step {ratios['train_time_ours_over_diffusers']:.3f}", ""]
    with open(os.path.join(args.output, f"cuda_{tag}.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
