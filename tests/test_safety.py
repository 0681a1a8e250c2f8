"""Safety checker (text_to_image.py --check_safety): version 1 against diffusers' own
StableDiffusionSafetyChecker, version 2 against a hand-written torch MLP on transformers' CLIP, on
both backends; default and missing checkpoint paths."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from common.evaluation import safety
from common.formats.checkpoint_io import save_state_dict
from common.errors import UserError

BACKENDS = ("cuda", "ascend")
PARITY = 1e-4


def _randomise(module, seed: int) -> None:
    """Unit-scale random weights (the default init is so small that every image embeds alike)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if re.search(r"(norm|layrnorm)\d*\.weight$", name):
                p.copy_(1 + 0.1 * n)
            elif name.endswith("bias"):
                p.copy_(0.02 * n)
            elif "embedding" in name and "patch" not in name:
                p.copy_(0.5 * n)
            else:
                p.copy_(n / np.sqrt(np.prod(p.shape[1:])))


@pytest.fixture(scope="module")
def images():
    """Four distinct non-square uint8 images: noise, a gradient, colour blocks, stripes."""
    rng = np.random.default_rng(0)
    h, w = 40, 52
    yy, xx = np.mgrid[:h, :w]
    return np.stack([
        rng.integers(0, 256, (h, w, 3)),
        np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 90)], -1),
        np.where((xx // 13 + yy // 10)[..., None] % 2 == 0, [250, 30, 30], [20, 60, 240]),
        np.stack([(xx % 8 < 4) * 255, np.full((h, w), 200), (yy % 6 < 3) * 120], -1),
    ]).astype(np.uint8)


# --------------------------------------------------------------------------- version 1

@pytest.fixture(scope="module")
def v1(tmp_path_factory, images):
    """A tiny diffusers checker whose concepts make images [clean, flagged, flagged only through the
    special-care adjustment, just below a concept]; saved as a folder and as a bare weight file."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    cfg = CLIPConfig(projection_dim=16,
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                     vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8))
    checker = StableDiffusionSafetyChecker(cfg).eval()
    _randomise(checker.vision_model, 0)
    _randomise(checker.visual_projection, 1)
    pixels = safety.clip_pixels(images, 32)
    with torch.no_grad():
        emb = checker.visual_projection(checker.vision_model(torch.from_numpy(pixels))[1]).numpy()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    off_diagonal = (unit @ unit.T)[~np.eye(len(unit), dtype=bool)]
    assert off_diagonal.max() < 0.95, "test images must embed apart for the chosen thresholds"
    rng = np.random.default_rng(2)
    concepts, concept_w = rng.standard_normal((17, 16)), np.full(17, 2.0)     # 2.0: never reached
    special, special_w = rng.standard_normal((3, 16)), np.full(3, 2.0)
    concepts[0], concept_w[0] = emb[1], 0.98      # image 1: score +0.02
    concepts[1], concept_w[1] = emb[2], 1.005     # image 2: -0.005, +0.01 adjustment -> flagged
    concepts[2], concept_w[2] = emb[3], 1.005     # image 3: -0.005, no special care -> clean
    special[0], special_w[0] = emb[2], 0.98       # image 2 hits a special-care concept
    with torch.no_grad():
        for name, value in (("concept_embeds", concepts), ("concept_embeds_weights", concept_w),
                            ("special_care_embeds", special), ("special_care_embeds_weights", special_w)):
            getattr(checker, name).copy_(torch.from_numpy(value).float())
    with torch.no_grad():
        _, ref_flags = checker(clip_input=torch.from_numpy(pixels), images=[im.copy() for im in images])
    folder = tmp_path_factory.mktemp("safety_v1")
    checker.save_pretrained(str(folder / "checker"))
    # The released checker nests the CLIPVisionModel (transformers 4 names); transformers 5 saves it flat.
    sd = {re.sub(r"^vision_model\.(?!vision_model\.)", "vision_model.vision_model.", k): v.numpy()
          for k, v in checker.state_dict().items()}
    assert "vision_model.vision_model.embeddings.class_embedding" in sd
    save_state_dict(str(folder / "bare" / "checker.safetensors"), sd)
    save_state_dict(str(folder / "bare" / "checker.ckpt"), sd, format="mindspore")
    return {"folder": str(folder / "checker"), "file": str(folder / "bare" / "checker.safetensors"),
            "ms_file": str(folder / "bare" / "checker.ckpt"), "emb": emb, "flags": np.array(ref_flags)}


def test_v1_thresholds_exercise_every_path(v1):
    assert v1["flags"].tolist() == [False, True, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_v1_matches_diffusers(v1, images, backend):
    checker = safety.SafetyChecker(backend, 1, v1["folder"])
    assert np.abs(checker.embed(images) - v1["emb"]).max() < PARITY
    out, flags = checker(images)
    assert flags.tolist() == v1["flags"].tolist()
    assert not out[flags].any() and np.array_equal(out[~flags], images[~flags])
    assert images[flags].any()                               # the input is left alone


@pytest.mark.parametrize("backend, key", [("cuda", "file"), ("ascend", "ms_file")])
def test_v1_bare_weight_file(v1, images, backend, key):
    """Without config.json the architecture comes from the shapes (64-wide heads, QuickGELU)."""
    checker = safety.SafetyChecker(backend, 1, v1[key])
    assert checker.source.arch.vision_heads == 2 and checker.source.arch.act == "quick_gelu"
    assert checker(images)[1].tolist() == v1["flags"].tolist()


def test_v1_arithmetic_by_hand():
    head = safety.ConceptHead(np.eye(3)[:2], np.array([0.5, 0.9]), np.eye(3)[2:], np.array([0.6]))
    e = np.array([[1.0, 0, 0], [0, 0.85, 0.8], [0, 0.85, 0.3], [0, 1, 0.8]])
    # rows 1 and 3 hit the special-care concept (cos 0.685, 0.625 > 0.6) but stay below concept 1
    # even with the adjustment (0.728, 0.781 + 0.01 < 0.9); row 2 passes it (0.943); row 0 concept 0.
    assert safety.concept_flags(e, head).tolist() == [True, False, True, False]
    special, concept = safety.concept_scores(np.array([[0, 0.6, 0.8]]), safety.ConceptHead(
        np.eye(3)[1:2], np.array([0.595]), np.eye(3)[2:], np.array([0.79])))
    assert special[0, 0] == pytest.approx(0.01) and concept[0, 0] == pytest.approx(0.015)


# --------------------------------------------------------------------------- version 2

@pytest.fixture(scope="module")
def v2(tmp_path_factory, images):
    """A tiny transformers CLIP folder and an NSFW head whose last bias puts the 0.2 threshold
    between the images' scores; reference scores from torch."""
    import torch
    from torch import nn
    from transformers import CLIPConfig, CLIPModel

    class Normalization(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.register_buffer("mean", torch.zeros(n))
            self.register_buffer("variance", torch.ones(n))

        def forward(self, x):
            return (x - self.mean) / self.variance.sqrt()

    class Head(nn.Module):                  # LAION's layout, smaller: 16 -> 8 -> 12 -> 6 -> 1
        def __init__(self):
            super().__init__()
            self.norm = Normalization(16)
            self.linear_1, self.linear_2 = nn.Linear(16, 8), nn.Linear(8, 12)
            self.linear_3, self.linear_4 = nn.Linear(12, 6), nn.Linear(6, 1)

        def forward(self, x):
            x = self.norm(x)
            for layer in (self.linear_1, self.linear_2, self.linear_3):
                x = torch.relu(layer(x))
            return torch.sigmoid(self.linear_4(x))[:, 0]

    torch.manual_seed(0)
    cfg = CLIPConfig(projection_dim=16,
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                     vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=3, image_size=32, patch_size=8))
    clip = CLIPModel(cfg).eval()
    _randomise(clip, 3)
    head = Head().eval()
    with torch.no_grad():
        head.norm.mean.copy_(0.05 * torch.randn(16))
        head.norm.variance.copy_(0.01 + 0.02 * torch.rand(16))
        head.linear_4.weight.mul_(30.0)           # spread the scores well beyond float32 noise
        head.linear_4.bias.zero_()
        feats = clip.get_image_features(pixel_values=torch.from_numpy(safety.clip_pixels(images, 32)))
        feats = getattr(feats, "pooler_output", feats)
        feats = nn.functional.normalize(feats, dim=-1)
        order = np.sort(torch.logit(head(feats).double()).numpy())
        split = int(np.argmax(np.diff(order)))
        assert order[split + 1] - order[split] > 0.05, "test images must score apart"
        # the 0.2 threshold falls in the widest gap between the images' scores: some flagged, some not
        head.linear_4.bias.fill_(float(np.log(0.2 / 0.8) - (order[split] + order[split + 1]) / 2))
        scores = head(feats).numpy()
    folder = tmp_path_factory.mktemp("safety_v2")
    clip.save_pretrained(str(folder / "clip"))
    sd = {k: v.numpy() for k, v in head.state_dict().items()}
    save_state_dict(str(folder / "l14_nsfw.safetensors"), sd)
    save_state_dict(str(folder / "l14_nsfw-c7c99ae7.ckpt"), sd, format="mindspore")
    return {"clip": str(folder / "clip"), "head": str(folder / "l14_nsfw.safetensors"),
            "ms_head": str(folder / "l14_nsfw-c7c99ae7.ckpt"), "scores": scores}


@pytest.mark.parametrize("backend, head", [("cuda", "head"), ("ascend", "ms_head")])
def test_v2_matches_torch_mlp(v2, images, backend, head):
    checker = safety.SafetyChecker(backend, 2, v2["clip"], v2[head])
    assert np.abs(safety.nsfw_scores(checker.embed(images), checker.head) - v2["scores"]).max() < PARITY
    batch = list(images)
    out, flags = checker(batch)
    assert flags.tolist() == (v2["scores"] > 0.2).tolist() and 0 < flags.sum() < len(flags)
    assert all(not o.any() if f else o is im for o, im, f in zip(out, batch, flags))


def test_check_safety_entry_and_defaults(v2, images, tmp_path, monkeypatch, caplog):
    """check_safety() with the head found under models/ (MindONE's file name), built once."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("models")
    os.symlink(v2["ms_head"], os.path.join("models", "l14_nsfw-c7c99ae7.ckpt"))
    assert safety.find_nsfw_ckpt() == os.path.join("models", "l14_nsfw-c7c99ae7.ckpt")
    out, flags = safety.check_safety(images, "pt", v2["clip"], 2)
    assert flags.tolist() == (v2["scores"] > 0.2).tolist() and not out[flags].any()
    assert safety.NSFW_MESSAGE in caplog.text
    assert safety.load_safety_checker("pt", v2["clip"], 2) is safety.load_safety_checker("pt", v2["clip"], 2)


# --------------------------------------------------------------------------- errors

def test_missing_checkpoints_are_user_errors(tmp_path, monkeypatch, v2):
    missing = str(tmp_path / "nowhere" / "safety_checker")
    with pytest.raises(UserError, match=re.escape(missing) + ".*StableDiffusionSafetyChecker.*nothing is downloaded"):
        safety.SafetyChecker("cuda", 1, missing)
    with pytest.raises(UserError, match=re.escape(missing) + ".*CLIP ViT-L/14"):
        safety.SafetyChecker("cuda", 2, missing, v2["head"])
    with pytest.raises(UserError, match=re.escape(missing) + ".*NSFW head"):
        safety.SafetyChecker("cuda", 2, v2["clip"], missing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(os.path.join("models", "safety_checker"))):
        safety.SafetyChecker("cuda", 1)
    with pytest.raises(UserError, match=re.escape(os.path.join("models", "l14_nsfw.safetensors"))):
        safety.SafetyChecker("cuda", 2, v2["clip"])
    with pytest.raises(UserError, match="1 or 2"):
        safety.SafetyChecker("cuda", 3, v2["clip"])
    with pytest.raises(UserError, match="not LAION"):
        safety.SafetyChecker("cuda", 2, v2["clip"], os.path.join(v2["clip"], "model.safetensors"))


def test_no_framework_at_import():
    code = "import sys, common.evaluation.safety; assert not {'torch', 'mindspore'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
