#!/usr/bin/env python
"""The demo behind `make demo`: DreamBooth on the sample subject (assets/sample_subject) from the
tiny model pretrained on the synthetic world (assets/tiny_world), with prior preservation.

The base model and the fine-tuned one draw the same prompts from the same seeds ("a photo of sks
robot", the identifier in new contexts, and the class prompt "a photo of a robot"); the world's own
CLIP and DINO score both sets against the subject's images. Everything lands in demo_output/
(replaced on each run):

    before/, after/        the images, in prompt order
    eval/results.json      {"before": {"clip_t", "clip_i", "dino"}, "after": {...}, "prompts": [...]}
    eval/report.md         the scores and a before | after grid per prompt
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import yaml

import _path  # noqa: F401

ROOT = _path.ROOT
OUT = os.path.join(ROOT, "demo_output")
WORLD = os.path.join(ROOT, "assets", "tiny_world")
TRAIN_CONFIG = os.path.join(ROOT, "configs", "train", "train_config_dreambooth_tiny.yaml")
with open(TRAIN_CONFIG, encoding="utf-8") as _f:
    _TRAINING = yaml.safe_load(_f)
# the base model is the one the training starts from
MODEL, CONFIG = (os.path.join(ROOT, _TRAINING[k]) for k in ("pretrained_model_path", "model_config"))
PROMPTS = ("a photo of sks robot", "a sks robot on the beach", "a sks robot in the snow", "a photo of a robot")
SAMPLES = 4


def run(*cmd: str) -> None:
    print("\n$ " + " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def sample(ckpt: str, folder: str, backend: str) -> list:
    """SAMPLES images per prompt, seeds 0.., into folder/samples; their paths in prompt order."""
    prompts = os.path.join(OUT, "prompts.txt")
    run("text_to_image.py", "--backend", backend, "--config", CONFIG, "--ckpt_path", ckpt, "--data_path", prompts,
        "--n_samples", str(SAMPLES), "--n_iter", "1", "--seed", "0", "--sampling_steps", "20", "--output_path", folder)
    return sorted(glob.glob(os.path.join(folder, "samples", "*.png")))


def evaluate(folder: str, backend: str) -> dict:
    """eval_dreambooth.py with the world CLIP and DINO; its results.json."""
    out = os.path.join(OUT, "eval", os.path.basename(folder))
    run("tools/eval/eval_dreambooth.py", "--gen_image_path_or_dir", os.path.join(folder, "samples"),
        "--prompt_or_path", os.path.join(OUT, "prompts.txt"), "--real_image_path_or_dir", "assets/sample_subject",
        "--ckpt_path", os.path.join(WORLD, "world_clip.safetensors"), "--config", os.path.join(WORLD, "world_clip.json"),
        "--dino_ckpt_path", os.path.join(WORLD, "world_dino.safetensors"),
        "--dino_config", os.path.join(WORLD, "world_dino.json"), "--identifier", "sks",
        "--output_path", out, "--overwrite", "True", "--backend", backend, "--quiet", "True")
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def report(before: dict, after: dict, before_images: list, after_images: list) -> str:
    """eval/results.json (before / after) and eval/report.md with a before | after grid per prompt."""
    from common.evaluation.scores import thumbnail_grid, write_json
    from common.images import save_png

    folder = os.path.join(OUT, "eval")
    names = ("clip_t", "clip_i", "dino")
    results = {"before": {k: before["scores"][k] for k in names}, "after": {k: after["scores"][k] for k in names},
               "prompts": [{"prompt": b["prompt"], "before": {k: b[k] for k in names}, "after": {k: a[k] for k in names}}
                           for b, a in zip(before["prompts"], after["prompts"])],
               "base_model": os.path.relpath(MODEL, ROOT), "judges": "assets/tiny_world world_clip / world_dino"}
    write_json(os.path.join(folder, "results.json"), results)
    lines = ["# DreamBooth on the tiny world model: before and after", "",
             "The base model (left) and the DreamBooth model (right) draw each prompt from the same seeds. "
             "Scores: the world's CLIP and DINO (assets/tiny_world), meaningful within the synthetic world only; "
             "CLIP-I and DINO compare each image with the subject's images, CLIP-T with its prompt (without `sks`).",
             "", "| | CLIP-T | CLIP-I | DINO |", "| --- | --- | --- | --- |"]
    for when, r in (("before", results["before"]), ("after", results["after"])):
        lines.append(f"| {when} | " + " | ".join(f"{r[k]['cosine']:.3f}" for k in names) + " |")
    lines += ["", "![the subject](../../assets/sample_subject/robot_00_front.png)", ""]
    for k, entry in enumerate(results["prompts"]):
        rows = slice(k * SAMPLES, (k + 1) * SAMPLES)
        grid = np.concatenate([np.asarray(thumbnail_grid(before_images[rows], size=96)),
                               np.full((96, 16, 3), 255, np.uint8), np.asarray(thumbnail_grid(after_images[rows], size=96))], 1)
        name = f"prompt_{k}.png"
        save_png(grid, os.path.join(folder, name))
        b, a = entry["before"], entry["after"]
        lines += [f"## {entry['prompt']}", "",
                  "CLIP-I " + f"{b['clip_i']:.3f} → {a['clip_i']:.3f} · DINO {b['dino']:.3f} → {a['dino']:.3f} · "
                  f"CLIP-T {b['clip_t']:.3f} → {a['clip_t']:.3f}", "", f"![{entry['prompt']}]({name})", ""]
    path = os.path.join(folder, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cuda", help="cuda (PyTorch) or ascend (MindSpore)")
    args = p.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    with open(os.path.join(OUT, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(PROMPTS) + "\n")
    before_images = sample(MODEL, os.path.join(OUT, "before"), args.backend)
    run("train_dreambooth.py", "--train_config", TRAIN_CONFIG, "--backend", args.backend)
    checkpoint = os.path.join(ROOT, _TRAINING["output_path"], "ckpt", f"sd-{_TRAINING['max_train_steps']}.safetensors")
    after_images = sample(checkpoint, os.path.join(OUT, "after"), args.backend)
    before, after = (evaluate(os.path.join(OUT, w), args.backend) for w in ("before", "after"))
    path = report(before, after, before_images, after_images)
    print("\n             CLIP-T  CLIP-I  DINO")
    for when, r in (("before", before), ("after", after)):
        print(f"  {when:9s}  " + "  ".join(f"{r['scores'][k]['cosine']:.3f}" for k in ("clip_t", "clip_i", "dino")))
    print(f"\ndemo done:\n  trained checkpoint  {checkpoint}\n  loss log            "
          f"{os.path.join(OUT, 'dreambooth', 'loss.csv')}\n  report              {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
