#!/usr/bin/env python
"""The demo behind `make demo`: make the embedded tiny SD2-architecture model, fine-tune it with
DreamBooth on the sample subject, generate images from the trained checkpoint, and evaluate them
(CLIP-T, CLIP-I, DINO) with tiny random CLIP/DINO models into a report.

Everything runs on CPU in about a minute and lands in demo_output/ (replaced on each run).
"""
import argparse
import glob
import os
import subprocess
import sys

import _path  # noqa: F401

ROOT = _path.ROOT
OUT = os.path.join(ROOT, "demo_output")


def run(*cmd: str) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", default="cuda", help="cuda (PyTorch) or ascend (MindSpore)")
    args = p.parse_args()
    model = os.path.join(OUT, "models", "tiny-v2.safetensors")
    run("tools/make_tiny_model.py", "--config", "configs/tiny-v2-inference.yaml", "--output", model,
        "--overwrite", "True")
    run("train_dreambooth.py", "--train_config", "configs/train/train_config_dreambooth_tiny.yaml",
        "--backend", args.backend, "--overwrite", "True")
    checkpoints = sorted(glob.glob(os.path.join(OUT, "dreambooth", "ckpt", "sd-*.safetensors")),
                         key=lambda p: int(os.path.basename(p)[3:].split(".")[0]))
    samples = os.path.join(OUT, "text_to_image")
    run("text_to_image.py", "--config", "configs/tiny-v2-inference.yaml", "--ckpt_path", checkpoints[-1],
        "--prompt", "a photo of sks robot on the beach", "--n_samples", "4", "--n_iter", "1",
        "--sampling_steps", "20", "--output_path", samples, "--backend", args.backend)
    evaluation = os.path.join(OUT, "eval")
    models = os.path.join(OUT, "eval_models")
    run("tools/make_tiny_eval_models.py", "--output_dir", models, "--overwrite", "True")
    run("tools/eval/eval_dreambooth.py", "--gen_image_path_or_dir", os.path.join(samples, "samples"),
        "--prompt_or_path", "a photo of sks robot on the beach", "--real_image_path_or_dir", "assets/sample_subject",
        "--ckpt_path", os.path.join(models, "tiny_clip.safetensors"), "--config", os.path.join(models, "tiny_clip.json"),
        "--dino_ckpt_path", os.path.join(models, "tiny_dino.safetensors"),
        "--dino_config", os.path.join(models, "tiny_dino.json"), "--identifier", "sks",
        "--output_path", evaluation, "--overwrite", "True", "--backend", args.backend)
    print(f"\ndemo done:\n  trained checkpoint  {checkpoints[-1]}\n  loss log            "
          f"{os.path.join(OUT, 'dreambooth', 'loss.csv')}\n  validation images   "
          f"{os.path.join(OUT, 'dreambooth', 'validation')}\n  generated images    {samples}\n"
          f"  evaluation report   {os.path.join(evaluation, 'report.md')} (tiny random CLIP/DINO: the scores "
          f"show the pipeline, not quality)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
