"""DreamBooth's claims, on a model that has learned something: the tiny SD1 model pretrained on the
synthetic world (assets/tiny_world), fine-tuned on the sample subject by train_dreambooth.py as
users run it, judged by the world's own CLIP and DINO and by the renderer's beach colours.

Per backend, three short runs from the pretrained model: full fine-tuning with prior preservation
and without it, and LoRA with it; every model draws the same prompts from the same seeds as the
base model.

(a) subject fidelity: the identifier prompt's images come much closer to the subject's images;
(b) context: "a sks robot on the beach" still shows a beach;
(c) language drift: without prior preservation the class prompt's images move toward the subject,
    with it less;
(d) LoRA reaches the subject fidelity of full fine-tuning.

The thresholds sit about halfway between what was measured (in each test's comment, torch and
MindSpore alike) and what the claim's failure would give.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import yaml

from conftest import ROOT, SUBJECT
from helpers.scripts import run_script

WORLD = os.path.join(ROOT, "assets", "tiny_world")
# the demo's recipe, as `make demo` trains it: 400 steps of batch 1 at 1e-4 with gradient clipping
# at 1, the text encoder frozen (diffusers' and MindONE's default; training it with prior
# preservation blurs the subject on this model), 16 class images
TRAIN_CONFIG = os.path.join(ROOT, "configs", "train", "train_config_dreambooth_tiny.yaml")
with open(TRAIN_CONFIG) as _f:
    DEMO = yaml.safe_load(_f)
MODEL, CONFIG = (os.path.join(ROOT, DEMO[k]) for k in ("pretrained_model_path", "model_config"))
IDENTITY, CLASS, STEPS = DEMO["instance_prompt"], DEMO["class_prompt"], DEMO["max_train_steps"]
BEACH = "a sks robot on the beach"
PROMPTS = (IDENTITY, BEACH, CLASS)
SAMPLES = 8
RUNS = {  # name: flags on top of the demo's (which has prior preservation)
    "prior": (),
    "no_prior": ("--with_prior_preservation", "False"),
    "lora": ("--use_lora", "True", "--lora_rank", 8, "--start_learning_rate", 1e-3),
}
# the renderer's beach (tools/make_sample_subject.py draws the world's backgrounds)
SAND, SEA = np.array([238, 214, 150]), np.array([30, 110, 190])


def sample(backend: str, folder: str, ckpt: str, *lora) -> dict:
    """{prompt: SAMPLES image paths}, seeds 0.. for every model."""
    prompts = os.path.join(folder, "prompts.txt")
    os.makedirs(folder, exist_ok=True)
    with open(prompts, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    run_script("text_to_image.py", "--backend", backend, "--config", CONFIG, "--ckpt_path", ckpt, "--data_path", prompts,
               "--n_samples", SAMPLES, "--n_iter", 1, "--seed", 0, "--sampling_steps", 20, "--output_path", folder, *lora)
    images = sorted(glob.glob(os.path.join(folder, "samples", "*.png")))
    assert len(images) == SAMPLES * len(PROMPTS)
    return {p: images[k * SAMPLES:(k + 1) * SAMPLES] for k, p in enumerate(PROMPTS)}


def dreambooth(backend: str, root: str) -> dict:
    """{model: {prompt: image paths}} for the base model and each of RUNS."""
    images = {"base": sample(backend, os.path.join(root, "base"), MODEL)}
    for name, flags in RUNS.items():
        out = os.path.join(root, name)
        run_script("train_dreambooth.py", "--train_config", TRAIN_CONFIG, "--backend", backend,
                   "--class_data_dir", os.path.join(root, "class_images"), "--output_path", out,
                   "--report_to", "none", "--validation_prompts", *flags)
        if "--use_lora" in flags:
            lora = ("--use_lora", "True", "--lora_ckpt_path", os.path.join(out, "ckpt", f"lora-{STEPS}"))
            images[name] = sample(backend, os.path.join(out, "samples"), MODEL, *lora)
        else:
            images[name] = sample(backend, os.path.join(out, "samples"), os.path.join(out, "ckpt", f"sd-{STEPS}.safetensors"))
    return images


def judge(backend: str, images: dict) -> dict:
    """{model: {prompt: {"clip_i", "dino"}}}: eval_dreambooth's per-prompt scores with the world's
    CLIP and DINO (mean cosine of the images to the subject's images)."""
    from common.evaluation.arguments import clip_tokenizer
    from common.evaluation.models import load_clip_source, load_dino_source
    from common.evaluation.scores import evaluate_dreambooth, load_clip_encoder, load_dino_encoder

    clip_source = load_clip_source(os.path.join(WORLD, "world_clip.safetensors"), None,
                                   os.path.join(WORLD, "world_clip.json"))
    dino_source = load_dino_source(os.path.join(WORLD, "world_dino.safetensors"), None,
                                   os.path.join(WORLD, "world_dino.json"))
    clip, dino = load_clip_encoder(backend, clip_source), load_dino_encoder(backend, dino_source)
    tokenizer = clip_tokenizer(clip_source, None)
    subject = sorted(glob.glob(os.path.join(SUBJECT, "*.png")))
    out = {}
    for model, prompts in images.items():
        results = evaluate_dreambooth(clip, tokenizer, list(prompts.items()), subject, dino=dino, identifier="sks")
        out[model] = {e["prompt"]: {"clip_i": e["clip_i"], "dino": e["dino"]} for e in results["prompts"]}
    return out


def beach_share(paths) -> float:
    """Fraction of the images that show the world's beach: sand below, sea above it, seen in the
    side strips (where the object rarely stands) in the renderer's own colours."""
    from PIL import Image

    hits = []
    for path in paths:
        x = np.asarray(Image.open(path).convert("RGB"), np.float64)
        h = x.shape[0]
        sides = np.concatenate([x[:, :h // 6], x[:, -(h // 6):]], 1)
        sand = np.median(sides[int(h * 0.75):].reshape(-1, 3), 0)
        sea = np.median(sides[int(h * 0.58):int(h * 0.67)].reshape(-1, 3), 0)
        hits.append(np.linalg.norm(sand - SAND) < 50 and np.linalg.norm(sea - SEA) < 60)
    return float(np.mean(hits))


class _Method:
    backend = None

    @pytest.fixture(scope="class")
    def measured(self, tmp_path_factory):
        images = dreambooth(self.backend, str(tmp_path_factory.mktemp(f"method_{self.backend}")))
        scores = judge(self.backend, images)
        beach = {run: {p: beach_share(paths) for p, paths in prompts.items()} for run, prompts in images.items()}
        print(self.backend, scores, beach)
        return scores, beach

    # Measured on torch (MindSpore draws the same images within one grey level), base -> after, mean
    # cosine to the subject's five images, CLIP-I / DINO:
    #   "a photo of sks robot"  base 0.432 / 0.248   prior 0.569 / 0.464   no prior 0.656 / 0.574   LoRA 0.655 / 0.513
    #   "a photo of a robot"    base 0.439 / 0.125   prior 0.537 / 0.399   no prior 0.601 / 0.515
    #   beach share of "a sks robot on the beach": base 0.88, prior 0.62, no prior 0.50, LoRA 0.25; of "a photo
    #   of sks robot": 0 for every model

    def test_subject_fidelity(self, measured):
        """(a) after DreamBooth the identifier draws the subject: measured rises +0.137 / +0.216
        (prior) and +0.224 / +0.326 (no prior); a model that learned nothing rises 0."""
        scores, _ = measured
        base = scores["base"][IDENTITY]
        for run in ("prior", "no_prior"):
            after = scores[run][IDENTITY]
            assert after["clip_i"] - base["clip_i"] >= 0.07, (run, after, base)
            assert after["dino"] - base["dino"] >= 0.1, (run, after, base)

    def test_context(self, measured):
        """(b) "on the beach" still puts the subject on the beach (0.50-0.62 of the images, against 0
        for the identifier alone): the renderer's sand and sea, not a learned judge. (LoRA's beach
        images have the sea but pinkish sand: 0.25 here, though the world CLIP names them all beach.)"""
        _, beach = measured
        for run in ("prior", "no_prior"):
            assert beach[run][BEACH] >= 0.375, (run, beach[run])
            assert beach[run][BEACH] - beach[run][IDENTITY] >= 0.25, (run, beach[run])

    def test_language_drift(self, measured):
        """(c) the class prompt moves toward the subject without prior preservation (measured
        +0.162 CLIP-I / +0.390 DINO), and less with it (+0.098 / +0.274)."""
        scores, _ = measured
        drift = {run: {k: scores[run][CLASS][k] - scores["base"][CLASS][k] for k in ("clip_i", "dino")}
                 for run in ("prior", "no_prior")}
        assert drift["no_prior"]["clip_i"] >= 0.08 and drift["no_prior"]["dino"] >= 0.2, drift
        assert drift["prior"]["dino"] <= drift["no_prior"]["dino"] - 0.05, drift
        assert drift["prior"]["clip_i"] < drift["no_prior"]["clip_i"], drift

    def test_lora_reaches_full_fine_tuning(self, measured):
        """(d) LoRA (rank 8, lr 1e-3) with prior preservation draws the subject as closely as full
        fine-tuning with it: measured 0.655 / 0.513 against 0.569 / 0.464."""
        scores, _ = measured
        lora, full = scores["lora"][IDENTITY], scores["prior"][IDENTITY]
        for k in ("clip_i", "dino"):
            assert lora[k] >= full[k] - 0.05, (k, lora, full)


@pytest.mark.timeout(1800)
class TestTorch(_Method):
    backend = "cuda"


@pytest.mark.timeout(1800)
class TestMindSpore(_Method):
    backend = "ascend"
