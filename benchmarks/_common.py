"""Helpers shared by the PyTorch-backend benchmarks (bench_cuda.py, bench_gpu.py). Nothing here
imports torch at module level: a benchmark's parent process stays light, and only the process
that measures a case pays for the frameworks."""
from __future__ import annotations

import os
import re
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROMPT, CLASS_PROMPT = "a photo of sks robot", "a photo of a robot"


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(stem: str, report: dict, markdown: str) -> None:
    """<stem>.json (the numbers) and <stem>.md (the table), printed too; what gets committed."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    print(markdown)


def slug(name: str) -> str:
    """A device name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def sampling_run(side: str, arch, weights, steps: int, size: int, scale: float = 7.5):
    """A zero-argument callable that samples one `size`px image with `steps` DPM-Solver++ steps and
    classifier-free guidance `scale`, VAE decode included, on the PyTorch backend's modules
    (backends.cuda.Pipeline: fp16 on a GPU, fp32 on the CPU). side "ours": our sampler loop
    (common.diffusion.generate.sample_latents + Pipeline.decode); side "diffusers": diffusers'
    StableDiffusionPipeline built on the same three modules, with the matching scheduler. Both
    encode the prompt and the empty negative prompt inside the call. Returns (run, pipe)."""
    import torch

    from backends.cuda import Pipeline
    from common.diffusion.generate import SampleSettings, sample_latents
    from common.tokenizer import tokenizer_for

    tok = tokenizer_for(arch.text)
    pipe = Pipeline(arch, weights)
    ids, neg = tok([PROMPT]), tok([""])
    if side == "ours":
        settings = SampleSettings(sampler="dpm_solver_pp", steps=steps, scale=scale, height=size, width=size,
                                  seed=0, progress=False)
        return (lambda: pipe.decode(sample_latents(pipe, arch, ids, neg, settings, (0, 0)))), pipe
    if side != "diffusers":
        raise ValueError(f"side must be ours or diffusers, got {side!r}")
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    sched = DPMSolverMultistepScheduler(beta_start=arch.schedule.linear_start, beta_end=arch.schedule.linear_end,
                                        beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    peer = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None, unet=pipe.unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    dev = pipe.device

    def run():
        return peer(prompt_embeds=pipe.encode_text(ids), negative_prompt_embeds=pipe.encode_text(neg),
                    num_inference_steps=steps, guidance_scale=scale, height=size, width=size, output_type="np",
                    generator=torch.Generator(dev).manual_seed(0)).images
    return run, pipe
