"""The tools behind assets/tiny_world, in short runs: tools/pretrain_tiny.py and
tools/pretrain_tiny_eval.py write what the project reads, and a continued pretraining keeps the
earlier run's VAE (its latent space) while training the rest further; tools/eval_tiny_world.py
measures how much of its prompts a world model follows."""
from __future__ import annotations

import os

import numpy as np

from conftest import ROOT
from helpers.scripts import run_script

CONFIG = os.path.join(ROOT, "configs", "tiny-v1-world.yaml")   # pretrain_tiny.py's default
WORLD = os.path.join(ROOT, "assets", "tiny_world")
TINY = ("--scenes", 24, "--batch_size", 4, "--threads", 1)


def test_pretraining_writes_a_model_and_continues_from_it(tmp_path):
    from common.formats import loading
    from common.formats.checkpoint_io import safetensors_metadata

    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    run_script("tools/pretrain_tiny.py", "--output", first, "--vae_steps", 2, "--unet_steps", 2, *TINY)
    again = run_script("tools/pretrain_tiny.py", "--output", first, "--unet_steps", 2, *TINY, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # another seed: another initialisation, which the continued run must not use
    run_script("tools/pretrain_tiny.py", "--output", second, "--init_from", first, "--unet_steps", 3, "--seed", 1, *TINY)
    arch = loading.model_arch(CONFIG, None)
    a, b = (loading.load_model_weights(str(p), arch) for p in (first, second))
    assert a.keys() == b.keys() and all(v.dtype == np.float16 for v in a.values())
    vae = [k for k in a if k.startswith("first_stage_model.")]
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert vae and unet and all(np.array_equal(a[k], b[k]) for k in vae)
    # trained further from the first run's UNet, not from its own initialisation
    drift = max(float(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)).max()) for k in unet)
    assert 0 < drift < 0.01, drift
    first_run, history = safetensors_metadata(str(first)), safetensors_metadata(str(second))
    assert history["command"].startswith(first_run["command"] + " ; then --output")   # how it was made, in order
    assert "--init_from" in history["command"] and float(history["minutes"]) >= float(first_run["minutes"])
    # a run on an earlier VAE (--vae_from) records that run's command first, too
    third = tmp_path / "third.safetensors"
    run_script("tools/pretrain_tiny.py", "--output", third, "--vae_from", first, "--unet_steps", 1, *TINY)
    assert safetensors_metadata(str(third))["command"].startswith(first_run["command"] + " ; then ")


def test_pretraining_refuses_a_device_it_cannot_use(tmp_path):
    """--device (cuda on a GPU machine) is checked before any work, in one line."""
    import torch

    out = tmp_path / "m.safetensors"
    bad = run_script("tools/pretrain_tiny.py", "--output", out, "--device", "tpu9", *TINY, check=False)
    assert bad.returncode == 2 and "--device tpu9" in bad.stderr
    if not torch.cuda.is_available():
        gpu = run_script("tools/pretrain_tiny.py", "--output", out, "--device", "cuda", *TINY, check=False)
        assert gpu.returncode == 2 and "no CUDA GPU" in gpu.stderr
    assert not out.exists()


def test_eval_pretraining_writes_models_the_evaluation_reads(tmp_path):
    from common.evaluation import scores
    from common.evaluation.models import load_clip_source, load_dino_source

    run_script("tools/pretrain_tiny_eval.py", "--output_dir", tmp_path, "--steps", 2, "--scenes", 24,
               "--batch_size", 8, "--threads", 1)
    clip = scores.load_clip_encoder("cuda", load_clip_source(str(tmp_path / "world_clip.safetensors"), None,
                                                             str(tmp_path / "world_clip.json")))
    dino = scores.load_dino_encoder("cuda", load_dino_source(str(tmp_path / "world_dino.safetensors"), None,
                                                             str(tmp_path / "world_dino.json")))
    for encoder in (clip, dino):
        size = encoder.arch.image_size
        assert np.isfinite(encoder.encode_images(np.zeros((1, 3, size, size), np.float32))).all()


def test_world_model_evaluation_names_what_the_samples_show(tmp_path):
    """tools/eval_tiny_world.py on the committed world model (one image per prompt, two steps):
    accuracies in results.json, a grid, and it keeps a filled output folder unless told."""
    import json

    model = os.path.join(WORLD, "tiny-v1-world.safetensors")
    out = tmp_path / "eval"
    run_script("tools/eval_tiny_world.py", "--ckpt_path", model, "--output_dir", out, "--n_samples", 1,
               "--sampling_steps", 2)
    results = json.load(open(out / "results.json"))
    assert {k: results[k]["chance"] for k in ("background", "class", "colour")} == {
        "background": 0.2, "class": 0.25, "colour": 0.25}
    assert all(0 <= results[k]["accuracy"] <= 1 and len(results[k]["picked"]) == round(1 / results[k]["chance"])
               for k in ("background", "class", "colour"))
    assert len(os.listdir(out / "samples")) == 13 and (out / "grid.png").is_file()
    again = run_script("tools/eval_tiny_world.py", "--ckpt_path", model, "--output_dir", out, check=False)
    assert again.returncode == 2 and "--overwrite True" in again.stderr
