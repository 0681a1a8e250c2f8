#!/usr/bin/env python
"""GPU benchmark: the PyTorch backend against diffusers, side by side in one run, full-size SD 1.5
(random weights: the numbers do not depend on trained values), on the device torch.cuda picks.

    python benchmarks/bench_gpu.py                    # everything, full size: the one command
    python benchmarks/bench_gpu.py --cases base lora  # some pairs (or single cases, e.g. gc_ours)
    python benchmarks/bench_gpu.py --tiny             # the tiny model, few reps (what the tests run)
    python benchmarks/bench_gpu.py --list

Cases (each `<pair>_ours` against `<pair>_diffusers` on the same modules, weights and batch):

  DreamBooth step  batch 1 + 1 class image (prior preservation), fp16 with loss scaling, AdamW,
                   gradient clipping at 1.0, full UNet + text encoder trained, unless a pair says:
      base             the baseline
      gc               + gradient checkpointing (UNet and text encoder)
      8bit             + bitsandbytes' 8-bit AdamW
      xformers         + --enable_xformers_memory_efficient_attention (needs xformers and a GPU)
      cache_latents    + --cache_latents (ours only: diffusers' train_dreambooth.py has no such flag),
                       against diffusers' base
      frozen_text      text encoder frozen (diffusers' default), the reference for the next one
      precompute_text  text encoder frozen, --pre_compute_text_embeddings (diffusers frees the encoder)
      fused            + --fused_adam (ours only: torch's fused AdamW kernel, our default on CUDA, where
                       diffusers' script leaves torch's default), against diffusers' base
      cache_all        text encoder frozen, --cache_latents, --pre_compute_text_embeddings and
                       --fused_adam (ours only), against diffusers' frozen_text: the same training
                       without the savers
  LoRA step        lora: rank 4 on to_q/to_k/to_v/to_out.0 of the UNet, base model in fp16, fp32
                   adapters; diffusers as train_dreambooth_lora.py (peft LoraConfig, add_adapter)
  Inference        sample: one image, --steps DPM-Solver++ steps, CFG 7.5, VAE decode included;
                   ours (Pipeline + common.diffusion.generate) vs StableDiffusionPipeline, fp16

"ours" runs backends.cuda.Trainer with parse_train_args flags and the train loop's own batch
(step_inputs / make_batch); "diffusers" is the loop of diffusers' examples/dreambooth scripts:
accelerate fp16 (autocast + GradScaler), VAE sampling and noise on the device.

Each case runs in its own process (with --tiny on a machine without a GPU, a fork of this one, so
the frameworks are imported once): time is the median of --reps steps after warm-up (at least 2
steps, more until an fp16 update is not skipped by the loss scaler, at most 20), synchronised
around each step; memory is torch.cuda.max_memory_allocated over warm-up and timed steps (reset
after the models are built), on the CPU the process's peak RSS. On the CPU everything runs in
fp32 (fp16 is not meaningful there) and the report says so. Cases that cannot run here (no
xformers, no bitsandbytes, out of memory, a flag this checkout lacks) are recorded as skipped with
the reason. Without a CUDA GPU and without --config, the tiny model runs (as --tiny), so that
`benchmarks/run.py` stays quick on a CPU machine. Writes --out .json and .md (default
benchmarks/results/gpu_<device>[_tiny].{json,md}); the exit status is 1 when a case failed (as
opposed to skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from _common import CLASS_PROMPT, PROMPT, ROOT, peak_rss_mb, sampling_run, slug, write_results  # noqa: E402

FULL_CONFIG = "configs/v1-inference.yaml"
TINY_CONFIG = "configs/tiny-v1-inference.yaml"
SIDES = ("ours", "diffusers")
LORA_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]       # diffusers' train_dreambooth_lora.py (SD 1.x)
LORA_RANK = 4
LR = {"train": 5e-6, "lora": 5e-4}                     # the two diffusers scripts' defaults (no effect on speed)
MAX_WARMUP = 20

# pair: (kind, what it changes against the baseline, settings, sides)
PAIRS = {
    "base": ("train", "baseline", {}, SIDES),
    "gc": ("train", "+ gradient checkpointing", {"gc": True}, SIDES),
    "8bit": ("train", "+ 8-bit AdamW (bitsandbytes)", {"adam8": True}, SIDES),
    "xformers": ("train", "+ xFormers attention", {"xformers": True}, SIDES),
    "cache_latents": ("train", "+ --cache_latents", {"cache_latents": True}, ("ours",)),
    "frozen_text": ("train", "text encoder frozen", {"train_text": False}, SIDES),
    "precompute_text": ("train", "text encoder frozen + --pre_compute_text_embeddings",
                        {"train_text": False, "precompute": True}, SIDES),
    "fused": ("train", "+ --fused_adam", {"fused": True}, ("ours",)),
    "cache_all": ("train", "text encoder frozen + --cache_latents + --pre_compute_text_embeddings + --fused_adam",
                  {"train_text": False, "cache_latents": True, "precompute": True, "fused": True}, ("ours",)),
    "lora": ("lora", f"LoRA rank {LORA_RANK}, attention layers, UNet only", {"lora": True, "train_text": False},
             SIDES),
    "sample": ("sample", "DPM-Solver++, CFG 7.5", {}, SIDES),
}
CASES = [f"{pair}_{side}" for pair, (_, _, _, sides) in PAIRS.items() for side in sides]
# savers diffusers' scripts lack: ours with the saver against diffusers' loop doing the same
# training without it (what a diffusers user runs for that training)
REFERENCE = {"cache_latents": "base", "fused": "base", "cache_all": "frozen_text"}
KIND_TITLES = {"train": "DreamBooth training step", "lora": "LoRA training step", "sample": "Inference"}


class Skip(Exception):
    """This case cannot run on this machine or checkout; the message says why."""


def _split(name: str):
    pair, _, side = name.rpartition("_")
    return pair, side


# --------------------------------------------------------------------------- measuring one case

def _sync(torch, cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def measure(step, torch, cuda: bool, reps: int, warmup: int) -> dict:
    """Warm up (at least `warmup` calls, then until a call reports no skipped update, at most
    MAX_WARMUP), then time `reps` calls, each synchronised. `step()` returns True when its
    optimizer update was skipped by the loss scaler (None for inference)."""
    _sync(torch, cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    done = 0
    while True:
        skipped = step()
        done += 1
        if done >= MAX_WARMUP or (done >= warmup and not skipped):
            break
    times, skips = [], 0
    for _ in range(reps):
        _sync(torch, cuda)
        t0 = time.perf_counter()
        skipped = step()
        _sync(torch, cuda)
        times.append(time.perf_counter() - t0)
        skips += bool(skipped)
    out = {"seconds": statistics.median(times), "times": times, "warmup_steps": done, "skipped_updates": skips,
           "peak_rss_mb": peak_rss_mb()}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2 ** 20
        out["peak_mb"], out["memory"] = out["peak_gpu_mb"], "GPU max_memory_allocated"
    else:
        out["peak_mb"], out["memory"] = out["peak_rss_mb"], "peak RSS (CPU)"
    return out


def environment() -> dict:
    """Versions and the device, as the measuring process sees them."""
    import importlib.metadata as md
    import platform

    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "xformers"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(device=props.name, device_kind="cuda", gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                   compute_capability=f"{props.major}.{props.minor}")
    else:
        env.update(device="cpu", device_kind="cpu")
    return env


def _need_xformers(cuda: bool) -> None:
    import importlib.util
    if not cuda:
        raise Skip("xformers needs a CUDA GPU")
    if importlib.util.find_spec("xformers") is None:
        raise Skip("xformers is not installed (pip install xformers); without it our flag falls back to "
                   "PyTorch's scaled_dot_product_attention, i.e. the base case")


def _inputs(arch, size: int):
    """One instance and one class image (uniform noise in [-1, 1]) and their prompt ids."""
    import numpy as np

    from common.tokenizer import tokenizer_for
    tok = tokenizer_for(arch.text)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    return images, tok([PROMPT]), tok([CLASS_PROMPT])


def ours_train(arch, weights, config: str, size: int, settings: dict, cuda: bool):
    """backends.cuda.Trainer as train_dreambooth.py builds it, fed by the train loop's own batch."""
    from backends.cuda import Trainer
    from common.diffusion.schedule import NoiseSchedule
    from common.errors import UserError
    from common.training.train_args import parse_train_args
    from common.training import train_loop

    flags = []
    if settings.get("gc"):
        flags += ["--gradient_checkpointing", "True"]
    if settings.get("adam8"):
        flags += ["--use_8bit_adam", "True"]
    if settings.get("xformers"):
        _need_xformers(cuda)
        flags += ["--enable_xformers_memory_efficient_attention", "True"]
    if settings.get("cache_latents"):
        flags += ["--cache_latents", "True"]
    if settings.get("precompute"):
        flags += ["--pre_compute_text_embeddings", "True"]
    if settings.get("fused"):
        flags += ["--fused_adam", "True"]
    if settings.get("lora"):
        flags += ["--use_lora", "True", "--lora_rank", str(LORA_RANK), "--lora_layers", "attention"]
    argv = ["--model_config", config, "--instance_data_dir", "instance", "--instance_prompt", PROMPT,
            "--class_data_dir", "class", "--class_prompt", CLASS_PROMPT, "--with_prior_preservation", "True",
            "--train_text_encoder", str(settings.get("train_text", True)), "--train_batch_size", "1",
            "--image_size", str(size), "--mixed_precision", "fp16" if cuda else "no", "--max_grad_norm", "1.0",
            "--start_learning_rate", str(LR["lora" if settings.get("lora") else "train"]), "--seed", "0",
            "--report_to", "none", "--output_path", os.devnull, *flags]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parse_train_args(argv)
    except (UserError, SystemExit) as e:
        raise Skip(f"parse_train_args rejects {' '.join(f for f in flags if f.startswith('--')) or 'the flags'}: "
                   f"{e}") from None
    encoded = None
    if getattr(args, "cache_latents", False) or getattr(args, "pre_compute_text_embeddings", False):
        if not hasattr(train_loop, "EncodedInputs"):
            raise Skip("this checkout's train loop has no EncodedInputs: --cache_latents / "
                       "--pre_compute_text_embeddings are parsed but not wired into the step yet")
    lora_init = train_loop.initial_lora(args, arch) if args.use_lora else None
    trainer = Trainer(arch, weights, args, lora_init)
    if getattr(args, "cache_latents", False) or getattr(args, "pre_compute_text_embeddings", False):
        encoded = train_loop.EncodedInputs(trainer, args.cache_latents, args.pre_compute_text_embeddings)
    images, ids, class_ids = _inputs(arch, size)
    data = dict(instance_images=images[:1], instance_ids=ids, instance_paths=["instance-0.png"],
                class_images=images[1:], class_ids=class_ids, class_paths=["class-0.png"])
    f = arch.vae.downsample_factor
    randoms = train_loop.step_inputs(NoiseSchedule(arch.schedule), args, 0, 0, 1, 1,
                                     (arch.vae.embed_dim, size // f, size // f), True)
    extra = (encoded,) if encoded is not None else ()
    lr = args.start_learning_rate

    def step():  # host batch (cached latents / embeddings looked up), the step, the update
        stats = trainer.train_step(train_loop.make_batch(data, randoms, args.prior_loss_weight, *extra), lr, True)
        float(stats["loss"])            # waits for the device
        return bool(float(stats.get("skipped", 0.0)))
    precision = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(trainer.dtype), "fp32")
    return step, precision, " ".join(flags)


def diffusers_train(arch, weights, size: int, settings: dict, cuda: bool):
    """The step of diffusers' examples/dreambooth/train_dreambooth.py (or, for LoRA,
    train_dreambooth_lora.py) with --with_prior_preservation, on the same modules and weights."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from backends.cuda.models import load_models

    lora, train_text = settings.get("lora", False), settings.get("train_text", True)
    precompute = settings.get("precompute", False)
    if settings.get("xformers"):
        _need_xformers(cuda)
    optimizer_class = torch.optim.AdamW
    if settings.get("adam8"):
        try:
            import bitsandbytes as bnb
        except Exception as e:      # missing, or a broken native library
            raise Skip(f"bitsandbytes cannot be imported ({type(e).__name__}: {str(e).strip()[:200]})") from None
        optimizer_class = bnb.optim.AdamW8bit
    accelerator = Accelerator(mixed_precision="fp16" if cuda else "no", cpu=not cuda)
    dev = accelerator.device
    weight_dtype = torch.float16 if cuda else torch.float32
    place = (lambda m: m.to(dev, dtype=weight_dtype)) if cuda else (lambda m: m.to(dev))  # noqa: E731
    unet, vae, text, _ = load_models(arch, weights)
    vae.requires_grad_(False)
    if not train_text:
        text.requires_grad_(False)
    if settings.get("xformers"):
        unet.enable_xformers_memory_efficient_attention()
    if lora:
        from peft import LoraConfig
        unet.requires_grad_(False)
        for m in (unet, vae, text):
            place(m)
    if settings.get("gc"):
        unet.enable_gradient_checkpointing()
        if train_text:
            text.gradient_checkpointing_enable()
    if lora:
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=LORA_MODULES))
        if weight_dtype == torch.float16:
            from diffusers.training_utils import cast_training_params
            cast_training_params(unet, dtype=torch.float32)
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        params = list(unet.parameters()) + (list(text.parameters()) if train_text else [])
    optimizer = optimizer_class(params, lr=LR["lora" if lora else "train"], betas=(0.9, 0.999),
                                weight_decay=1e-2, eps=1e-8)
    if train_text:
        unet, text, optimizer = accelerator.prepare(unet, text, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    place(vae)
    if not train_text:
        place(text)
    sched = DDPMScheduler(beta_start=arch.schedule.linear_start, beta_end=arch.schedule.linear_end,
                          beta_schedule="scaled_linear", num_train_timesteps=arch.schedule.timesteps)
    images, ids, class_ids = _inputs(arch, size)
    pixels = torch.from_numpy(images)                       # the data loader's CPU batch
    input_ids = torch.from_numpy(np.concatenate([ids, class_ids])).long()
    embeddings = None
    if precompute:                                          # then the text encoder is freed, as diffusers does
        with torch.no_grad():
            embeddings = text(input_ids.to(dev), attention_mask=None, return_dict=False)[0].float()
        text = None
        import gc
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    unet.train()
    if train_text:
        text.train()
    bsz = len(images)

    def step():
        pixel_values = pixels.to(dev, non_blocking=True).to(weight_dtype)
        with torch.no_grad():
            model_input = vae.encode(pixel_values).latent_dist.sample() * arch.scale_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=dev).long()
        noisy = sched.add_noise(model_input, noise, timesteps)
        if embeddings is not None:
            hidden = embeddings
        else:
            with torch.set_grad_enabled(train_text):
                hidden = text(input_ids.to(dev), attention_mask=None, return_dict=False)[0]
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        prior_loss = torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean") + 1.0 * prior_loss
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())            # waits for the device
        return bool(accelerator.optimizer_step_was_skipped)
    return step, "fp16" if cuda else "fp32", ""


def _record(name: str, status: str = "failed", reason: str = "") -> dict:
    pair, side = _split(name)
    kind, what, _, _ = PAIRS[pair]
    out = {"case": name, "pair": pair, "side": side, "kind": kind, "what": what, "status": status}
    if reason:
        out["reason"] = reason
    return out


def run_case(name: str, config: str, size: int, steps: int, reps: int, warmup: int) -> dict:
    """Measure one case in this process; never raises."""
    out = _record(name)
    kind, _, settings, _ = PAIRS[out["pair"]]
    side = out["side"]
    try:
        import torch

        from common.arch import load_arch
        from common.formats.init_weights import random_weights
        out["env"] = environment()
        cuda = torch.cuda.is_available()
        torch.manual_seed(0)
        arch = load_arch(config)
        size = size or arch.image_size
        arch.check_image_size(size, "--size")
        weights = random_weights(arch, seed=0)
        if kind == "sample":
            run, pipe = sampling_run(side, arch, weights, steps, size)

            def step():
                run()               # returns host numpy images: the device has finished
            precision = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(pipe.dtype), "fp32")
            flags = ""
            out["unit"] = f"s/image: {size}px, {steps} DPM-Solver++ steps, CFG 7.5, VAE decode"
            w = 1
        else:
            if side == "ours":
                step, precision, flags = ours_train(arch, weights, config, size, settings, cuda)
            else:
                step, precision, flags = diffusers_train(arch, weights, size, settings, cuda)
            out["unit"] = f"s/step: batch 1 + 1 class image, {size}px"
            w = warmup
        del weights
        out.update(precision=precision, flags=flags, size=size)
        out.update(measure(step, torch, cuda, reps, w))
        out["status"] = "measured"
    except Skip as e:
        out.update(status="skipped", reason=str(e))
    except ImportError as e:            # a missing optional package; one of ours missing is a failure
        ours = (e.name or "").split(".")[0] in ("common", "backends", "_common")
        out.update(status="failed" if ours else "skipped", reason=f"{'' if ours else 'missing package: '}{e}",
                   **({"traceback": traceback.format_exc()[-4000:]} if ours else {}))
    except Exception as e:
        import torch
        from common.errors import UserError
        if isinstance(e, torch.OutOfMemoryError):
            total = out.get("env", {}).get("gpu_memory_gb")
            out.update(status="skipped", reason=f"out of GPU memory ({total} GiB device)")
        elif isinstance(e, UserError):
            out.update(status="skipped", reason=str(e))
        else:
            out.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    return out


# --------------------------------------------------------------------------- running the cases

def _child_argv(name: str, opts) -> list:
    return [sys.executable, os.path.abspath(__file__), "--case", name, "--config", opts.config, "--size",
            str(opts.size), "--steps", str(opts.steps), "--reps", str(opts.reps), "--warmup", str(opts.warmup)]


def in_subprocess(name: str, opts) -> dict:
    try:
        proc = subprocess.run(_child_argv(name, opts), capture_output=True, text=True, cwd=ROOT, timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        return _record(name, reason=f"no result within --timeout {opts.timeout:g} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == -9 and not lines:     # SIGKILL: on a host, the kernel's out-of-memory killer
        gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        return _record(name, status="skipped", reason=f"killed by SIGKILL: most likely out of host memory "
                                                      f"({gib:.0f} GiB)")
    if proc.returncode or not lines:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        return _record(name, reason=f"process exited with {proc.returncode}: {' | '.join(tail) or 'no output'}")
    return json.loads(lines[-1])


def in_fork(name: str, opts) -> dict:
    """The case in a forked child of this process (frameworks already imported: no start-up cost,
    and its own peak RSS). For the CPU only: a process that has touched CUDA must not fork."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                            # the child
        code = 0
        try:
            os.close(read)
            result = run_case(name, opts.config, opts.size, opts.steps, opts.reps, opts.warmup)
            with os.fdopen(write, "w") as f:
                f.write(json.dumps(result))
        except BaseException:
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return _record(name, reason=f"forked child ended with status {status} and no result")
    return json.loads(text)


def _has_gpu() -> bool:
    """Whether torch sees a CUDA device (asked in a child process: this one may fork later)."""
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _fork_ok() -> bool:
    """Preload the frameworks for forked children, when nothing here has a GPU (a CUDA context, or
    even a CUDA driver initialised by a library's import, does not survive a fork)."""
    if glob.glob("/dev/nvidia[0-9]*") or not hasattr(os, "fork"):
        return False
    import importlib
    for module in ("torch", "diffusers", "diffusers.pipelines.stable_diffusion", "transformers", "accelerate",
                   "peft", "backends.cuda.trainer", "common.training.train_loop", "common.diffusion.generate"):
        importlib.import_module(module)
    import torch
    return not torch.cuda.is_initialized()


# --------------------------------------------------------------------------- the report

def ratios(results: list) -> dict:
    by = {r["case"]: r for r in results}
    out = {}
    for pair in PAIRS:
        reference = REFERENCE.get(pair, pair)
        ours, theirs = by.get(f"{pair}_ours"), by.get(f"{reference}_diffusers")
        if ours and theirs and ours["status"] == theirs["status"] == "measured":
            out[pair] = {"time_ours_over_diffusers": ours["seconds"] / theirs["seconds"],
                         "memory_ours_over_diffusers": ours["peak_mb"] / theirs["peak_mb"],
                         "against": f"{reference}_diffusers"}
    return out


def vs_base(results: list) -> None:
    """Each training case's time and memory relative to the same side's base case."""
    by = {r["case"]: r for r in results}
    for r in results:
        base = by.get(f"base_{r.get('side')}")
        if r.get("kind") == "train" and r["status"] == "measured" and base and base["status"] == "measured":
            r["time_vs_base"] = r["seconds"] / base["seconds"]
            r["memory_vs_base"] = r["peak_mb"] / base["peak_mb"]


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# PyTorch backend vs diffusers on {env.get('device', '?')}", "",
             f"{report['config']}, {report['size']} px, reps {report['reps']} (median), sampler steps "
             f"{report['steps']}; torch {env.get('torch')} (CUDA {env.get('cuda')}), diffusers {env.get('diffusers')}, "
             f"transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, peft {env.get('peft')}, "
             f"bitsandbytes {env.get('bitsandbytes')}, xformers {env.get('xformers')}"
             + (f"; GPU {env['device']} ({env.get('gpu_memory_gb')} GiB, sm {env.get('compute_capability')})"
                if env.get("device_kind") == "cuda" else ""), ""]
    if report.get("note"):
        lines += [f"**{report['note']}**", ""]
    lines += [f"Memory: {report['memory']}. Ratios are ours / diffusers (< 1: ours is faster or smaller); "
              "'vs base' is the same side's base case.", ""]
    for kind, title in KIND_TITLES.items():
        rows = [r for r in report["cases"] if r.get("kind") == kind]
        if not rows:
            continue
        unit = next((r["unit"] for r in rows if r.get("unit")), "")
        lines += [f"## {title}" + (f" ({unit})" if unit else ""), "",
                  "| case | settings | precision | seconds | peak MB | vs base (time / memory) | ours / diffusers (time / memory) | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            pair_ratio = report["ratios"].get(r["pair"]) if r["side"] == "ours" else None
            if r["status"] == "measured":
                base = (f"{r['time_vs_base']:.2f} / {r['memory_vs_base']:.2f}" if "time_vs_base" in r else "")
                ratio = (f"**{pair_ratio['time_ours_over_diffusers']:.3f} / "
                         f"{pair_ratio['memory_ours_over_diffusers']:.3f}**" if pair_ratio else "")
                if pair_ratio and pair_ratio["against"] != f"{r['pair']}_diffusers":
                    ratio += f" (against {pair_ratio['against']})"
                note = f"{r['skipped_updates']} of {len(r['times'])} updates skipped by the loss scaler" \
                    if r.get("skipped_updates") else ""
                lines.append(f"| {r['case']} | {r['what']} | {r['precision']} | {r['seconds']:.4f} | "
                             f"{r['peak_mb']:.0f} | {base} | {ratio} | {note} |")
            else:
                lines.append(f"| {r['case']} | {r.get('what', '')} | | | | | | {r['status']}: "
                             f"{r.get('reason', '').replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"architecture (default {FULL_CONFIG}; with --tiny {TINY_CONFIG})")
    p.add_argument("--size", type=int, default=0, help="image size in pixels (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps of the inference case (default 50; --tiny 3)")
    p.add_argument("--reps", type=int, default=None, help="timed steps / images per case, median (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="least warm-up training steps (default 2; --tiny 1)")
    p.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                   help=f"pairs ({', '.join(PAIRS)}) or single cases (e.g. gc_ours); default: all")
    p.add_argument("--out", default=None, help="results path stem: writes STEM.json and STEM.md "
                                               "(default benchmarks/results/gpu_<device>[_tiny])")
    p.add_argument("--tiny", action="store_true", help="the tiny model, few reps and steps (what the tests run)")
    p.add_argument("--isolation", choices=("process", "fork"), default=None,
                   help="each case in a new Python process (default), or in a fork of this one (default with "
                        "--tiny on a machine without a GPU: no framework start-up per case)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case before it counts as failed")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--case", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    # before torch is imported, here or in a case's process: OpenMP threads that spin while they
    # wait are many times slower on a CPU shared with other work (as in bench_backends.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fallback = None
    if not (opts.case or opts.list or opts.tiny or opts.config) and not _has_gpu():
        opts.tiny = True
        fallback = (f"Without a GPU and without --config, the tiny model ran (as --tiny); pass --config "
                    f"{FULL_CONFIG} to measure full size on the CPU (hours).")
        print(f"bench_gpu: {fallback}", file=sys.stderr)
    opts.config = opts.config or (TINY_CONFIG if opts.tiny else FULL_CONFIG)
    opts.steps = opts.steps or (3 if opts.tiny else 50)
    opts.reps = opts.reps or (2 if opts.tiny else 10)
    opts.warmup = opts.warmup or (1 if opts.tiny else 2)
    if opts.case:
        print(json.dumps(run_case(opts.case, opts.config, opts.size, opts.steps, opts.reps, opts.warmup)))
        return 0
    if opts.list:
        for pair, (kind, what, _, sides) in PAIRS.items():
            print(f"{pair:16s} {kind:7s} {' '.join(f'{pair}_{s}' for s in sides):42s} {what}")
        return 0
    from common.arch import load_arch
    from common.errors import UserError
    try:
        arch = load_arch(opts.config)
        if opts.size:
            arch.check_image_size(opts.size, "--size")
    except UserError as e:
        p.error(str(e))
    names = CASES
    if opts.cases:
        unknown = [c for c in opts.cases if c not in PAIRS and c not in CASES]
        if unknown:
            p.error(f"unknown case {', '.join(unknown)}; choose from {', '.join(PAIRS)} or {', '.join(CASES)}")
        names = [c for c in CASES if c in opts.cases or _split(c)[0] in opts.cases]
    isolation = opts.isolation or ("fork" if opts.tiny else "process")
    if isolation == "fork" and not _fork_ok():
        print("bench_gpu: a GPU is present: cases run in their own processes instead of forks", file=sys.stderr)
        isolation = "process"
    results = []
    for name in names:
        t0 = time.perf_counter()
        r = in_fork(name, opts) if isolation == "fork" else in_subprocess(name, opts)
        results.append(r)
        shown = f"{r['seconds']:.4f} s, {r['peak_mb']:.0f} MB ({r['precision']})" if r["status"] == "measured" \
            else f"{r['status']}: {r.get('reason', '')}"
        print(f"{name:24s} {shown}   [{time.perf_counter() - t0:.0f} s]", flush=True)
        if r["status"] == "failed" and r.get("traceback"):
            print(r["traceback"], file=sys.stderr)
    env = next((r["env"] for r in results if r.get("env")), {})
    cuda = env.get("device_kind") == "cuda"
    vs_base(results)
    report = {"benchmark": "bench_gpu", "device": env.get("device", "?"), "env": env, "config": opts.config,
              "size": next((r["size"] for r in results if r.get("size")), opts.size), "steps": opts.steps,
              "reps": opts.reps, "tiny": opts.tiny, "isolation": isolation,
              "memory": "torch.cuda.max_memory_allocated over warm-up and timed steps" if cuda
              else "peak RSS of the case's process",
              "note": None if cuda else " ".join(filter(None, (
                  "No CUDA GPU: measured on the CPU in fp32 (fp16 is not meaningful on a CPU); these numbers "
                  "say nothing about GPU performance.", fallback))),
              "cases": results, "ratios": ratios(results)}
    stem = opts.out or os.path.join(ROOT, "benchmarks", "results",
                                    f"gpu_{slug(env.get('device', 'cpu'))}{'_tiny' if opts.tiny else ''}")
    write_results(stem, report, markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
