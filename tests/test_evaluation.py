"""Evaluation: score definitions against hand computations, preprocessing against open_clip's,
weight layouts (open_clip, torch.save, open_clip checkpoints, TorchScript, transformers, MindSpore
.ckpt), PyTorch-vs-MindSpore parity of embeddings and scores, and the scripts' bad-input errors."""
from __future__ import annotations

import importlib
import json
import os
import sys
import warnings

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers.scripts import run_script
from conftest import ROOT, SUBJECT
from common.evaluation import scores as ev
from common.formats.checkpoint_io import save_state_dict
from common.errors import UserError
from common.evaluation.models import (ClipSource, clip_arch, clip_parameter_shapes, dino_arch,
                                      dino_parameter_shapes, load_clip_source, load_dino_source, open_clip_to_mindspore)
from common.tokenizer import CLIPTokenizer

EVAL = os.path.join(ROOT, "tools", "eval")
PARITY = 1e-4


def _tool(name: str):
    for folder in (os.path.join(ROOT, "tools"), EVAL):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _tool("make_tiny_eval_models").write_tiny_models(str(tmp_path_factory.mktemp("eval_models")))


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    """Four distinct 'generated' images: recoloured, cropped and noisy views of the sample subject."""
    folder = tmp_path_factory.mktemp("generated")
    rng = np.random.default_rng(0)
    subject = ev.list_eval_images(SUBJECT, "real")
    for i in range(4):
        im = np.asarray(Image.open(subject[i % len(subject)]).convert("RGB"), np.float32)
        im = im[: im.shape[0] - 20 * i, 10 * i:]                      # different aspect ratios
        im = im[..., [(i + c) % 3 for c in range(3)]] * (0.6 + 0.1 * i) + rng.normal(0, 12, im.shape)
        Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def clip_source(models):
    return load_clip_source(models["clip_ckpt"], config=models["clip_config"])


@pytest.fixture(scope="module")
def dino_source(models):
    return load_dino_source(models["dino_ckpt"], config=models["dino_config"])


@pytest.fixture(scope="module")
def encoders(clip_source, dino_source):
    """{backend: (clip encoder, dino encoder)} for the same tiny weights."""
    return {b: (ev.load_clip_encoder(b, clip_source), ev.load_dino_encoder(b, dino_source)) for b in ("cuda", "ascend")}


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer(context_length=77, pad_token=0)


# --------------------------------------------------------------------------- definitions

def test_scores_equal_hand_computation():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(6, 5)), rng.normal(size=(3, 5))
    s = ev.clip_t_scores(img, txt, ev.prompt_index(6, 3))
    cos = [img[i] @ txt[i // 2] / np.linalg.norm(img[i]) / np.linalg.norm(txt[i // 2]) for i in range(6)]
    assert s["cosine"] == pytest.approx(np.mean(cos), abs=1e-12)
    assert s["x100"] == pytest.approx(100 * np.mean(cos), abs=1e-10)
    assert s["torchmetrics"] == pytest.approx(max(100 * np.mean(cos), 0.0), abs=1e-10)
    assert s["x100_clamped_pairs"] == pytest.approx(np.mean([max(100 * c, 0) for c in cos]), abs=1e-10)
    assert s["pairs"] == 6

    # A negative mean: torchmetrics clamps the mean to 0, the per-pair clamp keeps the positive pairs.
    s = ev.clip_t_scores(np.array([[0.6, 0.8], [-2.0, 0.0]]), np.array([[3.0, 0.0]]), np.array([0, 0]))
    assert s["cosine"] == pytest.approx(-0.2) and s["torchmetrics"] == 0.0
    assert s["x100_clamped_pairs"] == pytest.approx(30.0)

    gen, real = rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
    full = [[g @ r / np.linalg.norm(g) / np.linalg.norm(r) for r in real] for g in gen]
    p = ev.pairwise_scores(gen, real)
    assert p["cosine"] == pytest.approx(np.mean(full), abs=1e-12) and p["pairs"] == 12
    assert p["per_generated_cosine"] == pytest.approx(np.mean(full, axis=1), abs=1e-12)


def test_evaluations_equal_hand_computation_on_model_embeddings(encoders, gen_dir, tokenizer):
    clip, dino = encoders["cuda"]
    gen = ev.list_eval_images(gen_dir, "generated")
    real = ev.list_eval_images(SUBJECT, "real")
    prompts = ["a photo of sks robot", "a robot on the moon"]

    def emb(enc, paths, mean, std):
        return enc.encode_images(np.stack([ev.preprocess_image(p, enc.arch.image_size, mean, std) for p in paths]))

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    g, r = emb(clip, gen, ev.CLIP_MEAN, ev.CLIP_STD), emb(clip, real, ev.CLIP_MEAN, ev.CLIP_STD)
    t = clip.encode_text(tokenizer(prompts))
    hand_t = [cos(g[i], t[i // 2]) for i in range(4)]              # images 0,1 -> prompt 0; 2,3 -> prompt 1
    res = ev.evaluate_clip_t(clip, tokenizer, gen, prompts, batch_size=3)
    assert res["cosine"] == pytest.approx(np.mean(hand_t), abs=1e-6)
    assert [row["cosine"] for row in res["per_image"]] == pytest.approx(hand_t, abs=1e-6)
    assert res["per_prompt_cosine"] == pytest.approx([np.mean(hand_t[:2]), np.mean(hand_t[2:])], abs=1e-6)

    hand_i = np.mean([[cos(a, b) for b in r] for a in g])
    assert ev.evaluate_pairwise(clip, gen, real, ev.CLIP_MEAN, ev.CLIP_STD, 2)["cosine"] == pytest.approx(hand_i, abs=1e-6)
    dg, dr = emb(dino, gen, ev.IMAGENET_MEAN, ev.IMAGENET_STD), emb(dino, real, ev.IMAGENET_MEAN, ev.IMAGENET_STD)
    hand_d = np.mean([[cos(a, b) for b in dr] for a in dg])

    groups = [(prompts[0], gen[:2]), (prompts[1], gen[2:])]
    db = ev.evaluate_dreambooth(clip, tokenizer, groups, real, dino=dino, batch_size=4)
    assert db["scores"]["clip_t"]["cosine"] == pytest.approx(np.mean(hand_t), abs=1e-6)
    assert db["scores"]["clip_i"]["cosine"] == pytest.approx(hand_i, abs=1e-6)
    assert db["scores"]["dino"]["cosine"] == pytest.approx(hand_d, abs=1e-6)
    assert db["prompts"][1]["clip_t"] == pytest.approx(np.mean(hand_t[2:]), abs=1e-6)
    assert db["prompts"][0]["clip_i"] == pytest.approx(np.mean([[cos(a, b) for b in r] for a in g[:2]]), abs=1e-6)


def test_preprocessing_is_open_clips(tmp_path):
    from open_clip.transform import image_transform

    rng = np.random.default_rng(2)
    for w, h in [(300, 200), (97, 150), (33, 32), (224, 224)]:
        path = str(tmp_path / f"{w}x{h}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        for size, mean, std in ((224, ev.CLIP_MEAN, ev.CLIP_STD), (32, ev.IMAGENET_MEAN, ev.IMAGENET_STD)):
            ref = image_transform(size, is_train=False, mean=mean, std=std)(Image.open(path)).numpy()
            np.testing.assert_allclose(ev.preprocess_image(path, size, mean, std), ref, rtol=0, atol=1e-6)


def test_prompts_and_grouping(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt \n")
    assert ev.read_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second prompt"]
    assert ev.read_prompts("a photo of sks dog") == ["a photo of sks dog"]
    with pytest.raises(UserError, match="prompt file not found"):
        ev.read_prompts(str(tmp_path / "missing.txt"))
    assert ev.prompt_index(6, 2).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(UserError, match="multiple of the number of prompts"):
        ev.prompt_index(5, 2)
    assert ev.strip_identifier("a sks dog, sks!", "sks") == "a dog, !"
    # one sub-folder per prompt: prompt.txt, else the folder name
    for name, prompt in (("a_dog", None), ("b", "a cat on a sofa")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "runs" / name / "0.png")
        if prompt:
            (tmp_path / "runs" / name / "prompt.txt").write_text(prompt)
    groups = ev.prompt_groups(str(tmp_path / "runs"), None)
    assert [g[0] for g in groups] == ["a dog", "a cat on a sofa"] and all(len(g[1]) == 1 for g in groups)


# --------------------------------------------------------------------------- architectures and weights

def test_architectures_match_open_clip_and_timm():
    import open_clip
    import timm

    arch = clip_arch("ViT-S-32")
    model = open_clip.create_model("ViT-S-32", pretrained=None, pretrained_text=False)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == clip_parameter_shapes(arch)
    assert clip_arch("clip_vit_b_16").act == "quick_gelu" and clip_arch().act == "gelu"
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == dino_parameter_shapes(dino_arch())


def test_config_files(tmp_path):
    """transformers' CLIPConfig keys, also nested as in a MindFormers yaml (model: model_config:)."""
    hf = {"projection_dim": 16, "text_config": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
                                                "intermediate_size": 64, "max_position_embeddings": 77},
          "vision_config": {"hidden_size": 48, "num_attention_heads": 3, "num_hidden_layers": 1, "intermediate_size": 96,
                            "image_size": 32, "patch_size": 8}}
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump({"model": {"model_config": hf}}))
    arch = clip_arch(config=str(tmp_path / "clip.yaml"))
    assert (arch.embed_dim, arch.vision_heads, arch.vision_mlp, arch.text_mlp, arch.act) == (16, 3, 96, 64, "quick_gelu")
    (tmp_path / "dino.json").write_text(json.dumps({"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 1,
                                                    "num_heads": 4}))
    d = dino_arch(config=str(tmp_path / "dino.json"))
    assert (d.image_size, d.grid, d.width, d.mlp, d.heads) == (64, 4, 64, 256, 4)


def test_weight_formats_load_the_same_clip(tmp_path, models, clip_source, tokenizer, gen_dir):
    import mindspore as ms
    import open_clip
    import torch

    arch, ref = clip_source.arch, clip_source.weights
    tensors = {k: torch.from_numpy(v.copy()) for k, v in ref.items()}
    torch.save(tensors, tmp_path / "sd.pt")
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in tensors.items()}},
               tmp_path / "open_clip_ckpt.pt")
    save_state_dict(str(tmp_path / "mindone.ckpt"), {open_clip_to_mindspore(k): v for k, v in ref.items()},
                    format="mindspore")
    dino = load_dino_source(models["dino_ckpt"], config=models["dino_config"])
    torch.save({"backbone." + k: torch.from_numpy(v.copy()) for k, v in {**dino.weights, "head.weight": np.ones(3)}.items()},
               tmp_path / "dino_teacher.pth")                    # DINO-style prefix, a head to ignore
    again = load_dino_source(str(tmp_path / "dino_teacher.pth"), config=models["dino_config"])
    assert all(np.array_equal(again.weights[k], v) for k, v in dino.weights.items())
    for name in ("sd.pt", "open_clip_ckpt.pt", "mindone.ckpt"):
        src = load_clip_source(str(tmp_path / name), config=models["clip_config"])
        assert src.weights.keys() == ref.keys(), name
        assert all(np.array_equal(src.weights[k], ref[k]) for k in ref), name

    # The ascend Cell's parameters are MindONE's names: mindspore.save_checkpoint gives that layout.
    net = ev.load_clip_encoder("ascend", clip_source).net
    ms.save_checkpoint(net, str(tmp_path / "cell.ckpt"))
    names = set(ms.load_checkpoint(str(tmp_path / "cell.ckpt")))
    assert names == {open_clip_to_mindspore(k) for k in ref}
    assert {"visual.transformer.resblocks.0.attn.in_proj.weight", "token_embedding.embedding_table",
            "ln_final.gamma", "visual.ln_pre.beta", "transformer.resblocks.1.mlp.c_fc.weight"} <= names

    # OpenAI's CLIP files are TorchScript archives: read with torch.jit.load, built with QuickGELU.
    model = open_clip.CLIP(**arch.open_clip_config()).eval()
    model.load_state_dict(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # TracerWarnings about shape checks
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
    traced.save(str(tmp_path / "openai.pt"))
    src = load_clip_source(str(tmp_path / "openai.pt"), config=models["clip_config"])
    assert src.kind == "torchscript" and src.arch.act == "quick_gelu"
    assert all(np.array_equal(src.weights[k], ref[k]) for k in ref)


def test_transformers_folder_on_both_backends(tmp_path, tokenizer, gen_dir):
    """A transformers CLIP folder: CLIPModel (cuda) == open_clip with the mapped weights == ascend."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(projection_dim=16,
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      max_position_embeddings=77, vocab_size=49408),
                     vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                                        image_size=32, patch_size=8))
    CLIPModel(cfg).save_pretrained(str(tmp_path / "hf"))
    src = load_clip_source(str(tmp_path / "hf"))
    assert src.kind == "transformers" and src.arch.act == "quick_gelu" and src.arch.vision_heads == 3
    hf = ev.load_clip_encoder("cuda", src)
    assert hf.hf and hf.library.startswith("transformers")
    others = [ev.load_clip_encoder("ascend", src),
              ev.load_clip_encoder("cuda", ClipSource(src.arch, "mapped", "safetensors", src.weights))]
    pixels = np.stack([ev.preprocess_image(p, 32) for p in ev.list_eval_images(gen_dir, "generated")])
    ids = tokenizer(["a photo of sks robot", "a robot on the moon"])
    for other in others:
        assert np.abs(other.encode_images(pixels) - hf.encode_images(pixels)).max() < PARITY
        assert np.abs(other.encode_text(ids) - hf.encode_text(ids)).max() < PARITY


def test_bad_weights_are_user_errors(tmp_path, models):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_clip_source(str(tmp_path / "none.safetensors"))
    with pytest.raises(UserError, match="missing"):
        load_clip_source(models["dino_ckpt"], config=models["clip_config"])
    with pytest.raises(UserError, match="not a ViT-B-16 CLIP"):
        load_clip_source(models["clip_ckpt"])                       # default ViT-B-16 vs tiny weights
    with pytest.raises(UserError, match="not supported"):
        clip_arch("RN50")
    with pytest.raises(UserError, match="unknown CLIP architecture"):
        clip_arch("ViT-Q-99")
    with pytest.raises(UserError, match="unknown DINO"):
        dino_arch("resnet50")


# --------------------------------------------------------------------------- backend parity

def test_backends_agree(encoders, gen_dir, tokenizer, capsys):
    gen = ev.list_eval_images(gen_dir, "generated")
    real = ev.list_eval_images(SUBJECT, "real")
    clip_px = np.stack([ev.preprocess_image(p, 32) for p in gen + real])
    dino_px = np.stack([ev.preprocess_image(p, 32, ev.IMAGENET_MEAN, ev.IMAGENET_STD) for p in gen + real])
    ids = tokenizer(["a photo of sks robot", "a robot on the moon, highly detailed"])
    (tc, td), (mc, md) = encoders["cuda"], encoders["ascend"]
    diffs = {"clip image": np.abs(tc.encode_images(clip_px) - mc.encode_images(clip_px)).max(),
             "clip text": np.abs(tc.encode_text(ids) - mc.encode_text(ids)).max(),
             "dino image": np.abs(td.encode_images(dino_px) - md.encode_images(dino_px)).max()}
    groups = [("a photo of sks robot", gen[:2]), ("a robot on the moon", gen[2:])]
    res = {b: ev.evaluate_dreambooth(c, tokenizer, groups, real, dino=d) for b, (c, d) in encoders.items()}
    for metric in ("clip_t", "clip_i", "dino"):
        diffs[metric] = abs(res["cuda"]["scores"][metric]["cosine"] - res["ascend"]["scores"][metric]["cosine"])
    with capsys.disabled():
        print("\nmax |cuda - ascend|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert all(v < PARITY for v in diffs.values()), diffs


# --------------------------------------------------------------------------- scripts

def run(script, *args):
    return run_script(os.path.join(EVAL, script), *args, check=False)


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in lines[0], lines[0]


def test_scripts_bad_input_one_line_errors(tmp_path, models, gen_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "bad" / "0.png")
    (tmp_path / "bad" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    clip = ["--ckpt_path", models["clip_ckpt"], "--config", models["clip_config"]]
    cases = [
        ("eval_clip_score.py", ["--image_path_or_dir", tmp_path / "empty", "--prompt_or_path", "x", *clip], "no generated images"),
        ("eval_clip_score.py", ["--image_path_or_dir", gen_dir, "--prompt_or_path", tmp_path / "three.txt", *clip],
         "4 images cannot be split evenly over 3 prompts"),
        ("eval_clip_score.py", ["--image_path_or_dir", tmp_path / "bad", "--prompt_or_path", "x", *clip], "cannot read image"),
        ("eval_clip_score.py", ["--image_path_or_dir", gen_dir, "--prompt_or_path", "x", "--ckpt_path",
                                tmp_path / "clip.safetensors"], "checkpoint not found"),
        ("eval_clip_i_score.py", ["--gen_image_path_or_dir", gen_dir, "--real_image_path_or_dir", tmp_path / "nowhere", *clip],
         "real images not found"),
        ("eval_dino_score.py", ["--gen_image_path_or_dir", gen_dir, "--real_image_path_or_dir", SUBJECT], "no checkpoint given"),
        ("eval_dreambooth.py", ["--gen_image_path_or_dir", gen_dir, "--real_image_path_or_dir", SUBJECT, *clip],
         "give the prompts"),
        ("eval_dreambooth.py", ["--gen_image_path_or_dir", gen_dir, "--prompt_or_path", "x", "--real_image_path_or_dir",
                                SUBJECT, *clip, "--dino_ckpt_path", tmp_path / "dino.pth"], "checkpoint not found"),
        ("eval_clip_score.py", ["--image_path_or_dir", gen_dir, "--prompt_or_path", "x", *clip, "--backend", "tpu"],
         "unknown backend"),
    ]
    for script, args, needle in cases:
        assert_one_line_error(run(script, *args), needle)


def test_scripts_run_on_both_backends(tmp_path, models, gen_dir):
    """The three score scripts in-process on both backends: same JSON scores within PARITY."""
    clip = ["--ckpt_path", models["clip_ckpt"], "--config", models["clip_config"]]
    dino = ["--ckpt_path", models["dino_ckpt"], "--config", models["dino_config"]]
    runs = {"eval_clip_score": ["--image_path_or_dir", gen_dir, "--prompt_or_path", "a photo of sks robot", *clip],
            "eval_clip_i_score": ["--gen_image_path_or_dir", gen_dir, "--real_image_path_or_dir", SUBJECT, *clip,
                                  "--save_result", "True"],
            "eval_dino_score": ["--gen_image_path_or_dir", gen_dir, "--real_image_path_or_dir", SUBJECT, *dino,
                                "--save_result"]}
    for script, args in runs.items():
        main = _tool(script).main
        out = {}
        for backend in ("cuda", "ms"):
            path = tmp_path / f"{script}-{backend}.json"
            assert main([*map(str, args), "--backend", backend, "--result_path", str(path), "--quiet"]) == 0
            out[backend] = json.loads(path.read_text())
        assert out["cuda"]["model"]["backend"] == "cuda" and out["ms"]["model"]["backend"] == "ascend"
        assert len(out["cuda"]["per_image"]) == 4
        assert abs(out["cuda"]["scores"]["cosine"] - out["ms"]["scores"]["cosine"]) < PARITY, script
        assert out["ms"]["scores"]["x100"] == pytest.approx(100 * out["ms"]["scores"]["cosine"])


def test_dreambooth_report_command(tmp_path, models, gen_dir):
    out = tmp_path / "eval"
    args = ["--gen_image_path_or_dir", gen_dir, "--prompt_or_path", "a photo of sks robot",
            "--real_image_path_or_dir", SUBJECT, "--ckpt_path", models["clip_ckpt"], "--config", models["clip_config"],
            "--dino_ckpt_path", models["dino_ckpt"], "--dino_config", models["dino_config"], "--identifier", "sks",
            "--output_path", out, "--backend", "ascend"]
    proc = run("eval_dreambooth.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]) == {"clip_t", "clip_i", "dino"} and results["backend"] == "ascend"
    assert results["prompts"][0]["clip_t_prompt"] == "a photo of robot" and len(results["prompts"][0]["images"]) == 4
    assert results["scores"]["clip_i"]["pairs"] == 4 * 5
    report = (out / "report.md").read_text()
    assert "tiny random CLIP" in report and "tiny random DINO" in report
    assert "![prompt 1](grids/prompt_000.png)" in report and (out / "grids" / "prompt_000.png").is_file()
    assert Image.open(out / "grids" / "real_images.png").size == (3 * 128, 2 * 128)     # 5 thumbnails
    assert_one_line_error(run("eval_dreambooth.py", *args), "already exists")          # no silent overwrite


def test_builtin_clip_configs_equal_open_clips(monkeypatch):
    """Without open_clip (an Ascend install) the standard ViTs are known from built-in configs,
    which must be open_clip's own."""
    import json

    from common.evaluation import models as em

    folder = em.open_clip_config_dir()
    if folder is None:
        pytest.skip("open_clip not installed")
    names = [n + q for n in em.BUILTIN_CLIP_CONFIGS for q in ("", "-quickgelu")]
    with_open_clip = {n: em.clip_arch(n) for n in names + ["clip_vit_l_14"]}
    for name in em.BUILTIN_CLIP_CONFIGS:
        with open(os.path.join(folder, name + ".json")) as f:
            assert json.load(f) == em.BUILTIN_CLIP_CONFIGS[name]
    monkeypatch.setattr(em, "open_clip_config_dir", lambda: None)
    assert {n: em.clip_arch(n) for n in with_open_clip} == with_open_clip
    with pytest.raises(UserError, match="ViT-g-14.*--config"):
        em.clip_arch("ViT-g-14")
