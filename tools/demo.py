#!/usr/bin/env python
"""The demo behind `make demo`: DreamBooth teaches a tiny pretrained Stable Diffusion the sample
subject (assets/sample_subject, a robot its world never showed), and the report shows it.

1. train_dreambooth.py: DreamBooth with prior preservation, from assets/tiny_world's model
   (configs/train/train_config_dreambooth_tiny.yaml; the class images come from the base model);
2. text_to_image.py: the same prompts and seeds on the base model ("before") and the trained one
   ("after");
3. tools/eval/eval_dreambooth.py: CLIP-T, CLIP-I and DINO of both, with the CLIP and DINO models
   trained on the same world (scores mean something within that world only);
4. demo_output/eval/report.md: before and after side by side, and results.json with the scores.

About two minutes on a CPU; demo_output/ is replaced on each run.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import _path  # noqa: F401

ROOT = _path.ROOT
OUT = os.path.join(ROOT, "demo_output")
WORLD = os.path.join("assets", "tiny_world")
BASE_MODEL = os.path.join(WORLD, "tiny-v1-world.safetensors")
CONFIG = os.path.join("configs", "tiny-v1-inference.yaml")
TRAIN_CONFIG = os.path.join("configs", "train", "train_config_dreambooth_tiny.yaml")
IDENTIFIER = "sks"
PROMPTS = ["a photo of sks robot", "a sks robot on the beach", "a sks robot in the snow", "a photo of a robot"]
IMAGES_PER_PROMPT = 4
SEED = 0
METRICS = ("clip_t", "clip_i", "dino")


def run(*cmd: str) -> None:
    print("\n$ python " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def summarise(results: dict) -> dict:
    """Scores over the identifier prompts (the subject), and over the class prompt alone (language
    drift: how much plain 'robot' images look like the subject)."""
    def mean(entries, key):
        return float(np.mean([e[key] for e in entries]))

    subject = [e for e in results["prompts"] if IDENTIFIER in e["prompt"].split()]
    plain = [e for e in results["prompts"] if IDENTIFIER not in e["prompt"].split()]
    return {**{m: mean(subject, m) for m in METRICS},
            "class_prompt": {m: mean(plain, m) for m in ("clip_i", "dino")},
            "prompts": {e["prompt"]: {m: e[m] for m in METRICS} for e in results["prompts"]}}


def write_report(folder: str, runs: dict) -> str:
    """results.json ({before, after}: clip_t, clip_i, dino over the identifier prompts) and
    report.md with one before | after grid per prompt."""
    from common.evaluation.scores import thumbnail_grid, write_json
    from common.images import save_png

    scores = {name: summarise(res) for name, res in runs.items()}
    write_json(os.path.join(folder, "results.json"), scores)
    before, after = scores["before"], scores["after"]
    lines = ["# DreamBooth demo: before and after", "",
             f"Tiny SD1 model pretrained on the synthetic world ({BASE_MODEL}), fine-tuned with DreamBooth "
             f"and prior preservation on assets/sample_subject. Same prompts and seeds before and after; "
             f"CLIP and DINO are the tiny models trained on the same world, so the scores compare images "
             f"within that world, not with real photos.", "",
             "| score | before | after |", "| --- | --- | --- |"]
    names = {"clip_t": "CLIP-T (prompt fidelity)", "clip_i": "CLIP-I (subject fidelity)", "dino": "DINO (subject fidelity)"}
    for m in METRICS:
        lines.append(f"| {names[m]}, identifier prompts | {before[m]:.4f} | {after[m]:.4f} |")
    for m in ("clip_i", "dino"):
        lines.append(f"| {names[m].split(' (')[0]} of \"{PROMPTS[-1]}\" to the subject (language drift) | "
                     f"{before['class_prompt'][m]:.4f} | {after['class_prompt'][m]:.4f} |")
    lines += ["", "![the subject](before/grids/real_images.png)", ""]
    os.makedirs(os.path.join(folder, "grids"), exist_ok=True)
    for k, prompt in enumerate(PROMPTS):
        pair = [np.asarray(thumbnail_grid(next(e["images"] for e in runs[name]["prompts"] if e["prompt"] == prompt)))
                for name in ("before", "after")]
        grid = os.path.join("grids", f"before_after_{k}.png")
        gap = np.full((pair[0].shape[0], 8, 3), 255, np.uint8)
        save_png(np.concatenate([pair[0], gap, pair[1]], axis=1), os.path.join(folder, grid))
        s0, s1 = before["prompts"][prompt], after["prompts"][prompt]
        lines += [f"## {prompt}", "", f"before (left): CLIP-I {s0['clip_i']:.3f}, DINO {s0['dino']:.3f} · "
                  f"after (right): CLIP-I {s1['clip_i']:.3f}, DINO {s1['dino']:.3f}", "", f"![{prompt}]({grid})", ""]
    path = os.path.join(folder, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cuda", help="cuda (PyTorch) or ascend (MindSpore)")
    args = p.parse_args()
    for old in ("dreambooth", "before", "after", "eval"):
        shutil.rmtree(os.path.join(OUT, old), ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)
    run("train_dreambooth.py", "--train_config", TRAIN_CONFIG, "--backend", args.backend, "--overwrite", "True")
    ckpt = os.path.join(OUT, "dreambooth", "ckpt")
    trained = max((os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.startswith("sd-")),
                  key=lambda p: int(os.path.basename(p)[3:].split(".")[0]))
    prompts = os.path.join(OUT, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    world = os.path.join(ROOT, WORLD)
    runs = {}
    for name, ckpt in (("before", BASE_MODEL), ("after", trained)):
        run("text_to_image.py", "--backend", args.backend, "--config", CONFIG, "--ckpt_path", ckpt, "--data_path", prompts,
            "--n_samples", str(IMAGES_PER_PROMPT), "--n_iter", "1", "--seed", str(SEED), "--output_path",
            os.path.join(OUT, name))
        evaluation = os.path.join(OUT, "eval", name)
        run("tools/eval/eval_dreambooth.py", "--backend", args.backend, "--gen_image_path_or_dir",
            os.path.join(OUT, name, "samples"), "--prompt_or_path", prompts, "--identifier", IDENTIFIER,
            "--real_image_path_or_dir", "assets/sample_subject",
            "--ckpt_path", os.path.join(world, "world_clip.safetensors"), "--config", os.path.join(world, "world_clip.json"),
            "--dino_ckpt_path", os.path.join(world, "world_dino.safetensors"),
            "--dino_config", os.path.join(world, "world_dino.json"), "--output_path", evaluation, "--quiet", "True")
        runs[name] = json.load(open(os.path.join(evaluation, "results.json")))
    report = write_report(os.path.join(OUT, "eval"), runs)
    scores = json.load(open(os.path.join(OUT, "eval", "results.json")))
    print("\ndemo done (identifier prompts; class prompt in the report):")
    for m in METRICS:
        print(f"  {m:7s} before {scores['before'][m]:.4f}   after {scores['after'][m]:.4f}")
    print(f"  trained checkpoint  {trained}\n  loss log            {os.path.join(OUT, 'dreambooth', 'loss.csv')}\n"
          f"  images              {os.path.join(OUT, 'before')}, {os.path.join(OUT, 'after')}\n"
          f"  report              {report}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
