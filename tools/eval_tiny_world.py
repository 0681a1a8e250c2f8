#!/usr/bin/env python
"""How well a model trained on the synthetic world (tools/pretrain_tiny.py) follows its prompts:
it draws images for "a robot on the beach" ... (each background), "a photo of a mug" ... (each
class) and "a red robot" ... (a few colours), and the world CLIP (assets/tiny_world) names each
image's background, class and colour zero-shot. The accuracies (chance: 1/5, 1/4, 1/4) say how
much of the caption the model uses, which is what DreamBooth needs to bind an identifier; the same
CLIP names the backgrounds of the world's own images every time (tests/test_synthetic_world.py).

    python tools/eval_tiny_world.py --ckpt_path assets/tiny_world/tiny-v1-world.safetensors \\
        --output_dir world_eval [--n_samples 8]

writes results.json (accuracies and per-prompt picks), grid.png (a row per prompt) and the images
(samples/, in prompt order).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import numpy as np

import _path  # noqa: F401  (repository root on sys.path)
from common.cli import run_cli
from common.config import UserArgumentParser, add_bool, backend_name, ranged
from common.errors import UserError
from synthetic_world import BACKGROUNDS, CLASSES

ROOT = _path.ROOT
WORLD = os.path.join(ROOT, "assets", "tiny_world")
COLOURS = ("red", "yellow", "green", "blue")
# what is named: the prompts the model draws, which are also the texts the CLIP chooses among
PROBES = {
    "background": [f"a robot {BACKGROUNDS[b]}" for b in BACKGROUNDS],
    "class": [f"a photo of a {c}" for c in CLASSES],
    "colour": [f"a {c} robot" for c in COLOURS],
}


def main() -> int:
    p = UserArgumentParser(prog="eval_tiny_world.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="the model: an original-layout checkpoint of the tiny SD1 architecture")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny-v1-world.yaml"), help="its architecture yaml")
    p.add_argument("--output_dir", required=True, help="folder for results.json, grid.png and the samples")
    p.add_argument("--n_samples", type=ranged(int, low=1), default=8, help="images per prompt (one batch, seeds from --seed)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--sampling_steps", type=ranged(int, low=1), default=20, help="sampler steps (dpm_solver_pp)")
    p.add_argument("--backend", type=backend_name, default="cuda", help="cuda (PyTorch) or ascend (MindSpore): sampling and CLIP")
    add_bool(p, "--overwrite", default=False, help="replace an existing --output_dir")
    args = p.parse_args()
    if not os.path.isfile(args.ckpt_path):
        raise UserError(f"--ckpt_path {args.ckpt_path} is not a file")
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        if not args.overwrite:
            raise UserError(f"{args.output_dir} is not empty (pass --overwrite True to replace it)")
        shutil.rmtree(args.output_dir)

    from common.evaluation import scores
    from common.evaluation.arguments import clip_tokenizer
    from common.evaluation.models import load_clip_source
    from common.images import save_png

    os.makedirs(args.output_dir, exist_ok=True)
    prompts = [prompt for drawn in PROBES.values() for prompt in drawn]
    prompt_file = os.path.join(args.output_dir, "prompts.txt")
    with open(prompt_file, "w", encoding="utf-8") as f:
        f.write("\n".join(prompts) + "\n")
    sampled = subprocess.run([sys.executable, os.path.join(ROOT, "text_to_image.py"), "--backend", args.backend,
                              "--config", args.config, "--ckpt_path", args.ckpt_path, "--data_path", prompt_file,
                              "--n_samples", str(args.n_samples), "--n_iter", "1", "--seed", str(args.seed),
                              "--sampling_steps", str(args.sampling_steps), "--output_path", args.output_dir])
    if sampled.returncode:
        raise UserError(f"text_to_image.py failed (exit {sampled.returncode}); its message is above")
    samples = os.path.join(args.output_dir, "samples")
    images = [os.path.join(samples, n) for n in sorted(os.listdir(samples))]

    source = load_clip_source(os.path.join(WORLD, "world_clip.safetensors"), None, os.path.join(WORLD, "world_clip.json"))
    clip = scores.load_clip_encoder(args.backend, source)
    tokenizer = clip_tokenizer(source, None)
    embedded = scores.embed_images(clip, images, scores.CLIP_MEAN, scores.CLIP_STD)
    results, first = {"model": os.path.abspath(args.ckpt_path), "n_samples": args.n_samples, "seed": args.seed}, 0
    for name, drawn in PROBES.items():
        rows = embedded[first * args.n_samples:(first + len(drawn)) * args.n_samples]
        picks = scores.cosine_matrix(rows, scores.embed_texts(clip, tokenizer, drawn)).argmax(axis=1)
        truth = np.repeat(np.arange(len(drawn)), args.n_samples)
        results[name] = {"accuracy": float(np.mean(picks == truth)), "chance": 1 / len(drawn),
                         "picked": {prompt: [drawn[i] for i in picks[k * args.n_samples:(k + 1) * args.n_samples]]
                                    for k, prompt in enumerate(drawn)}}
        first += len(drawn)
    scores.write_json(os.path.join(args.output_dir, "results.json"), results)
    grid = np.concatenate([np.asarray(scores.thumbnail_grid(images[k * args.n_samples:(k + 1) * args.n_samples],
                                                            size=64, max_images=args.n_samples))
                           for k in range(len(prompts))])
    save_png(grid, os.path.join(args.output_dir, "grid.png"))
    for name in PROBES:
        print(f"{name:10s} accuracy {results[name]['accuracy']:.3f}   (chance {results[name]['chance']:.3f})")
    print(f"wrote {os.path.join(args.output_dir, 'results.json')} and grid.png (a row per prompt: {', '.join(prompts)})")
    return 0


if __name__ == "__main__":
    run_cli(main)
