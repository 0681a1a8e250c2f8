"""MindONE users' files and commands as they are: its model configs, its -v table, its
text_to_image flags, and MindSpore checkpoints that MindONE's networks load completely."""
import dataclasses
import os
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, TINY
from test_cli import assert_one_line_error, run, sample
from common import watermark
from common.arch import load_arch

MINDONE_CONFIGS = {"train_dreambooth_sd_v2.yaml": "v2-inference.yaml", "v2-train.yaml": "v2-inference.yaml",
                   "v2-vpred-train.yaml": "v2-vpred-inference.yaml", "v1-train.yaml": "v1-inference.yaml",
                   "train_dreambooth_sd_v1.yaml": "v1-inference.yaml"}


def _fields(arch):
    d = dataclasses.asdict(arch)
    d.pop("path")
    return d


@pytest.mark.parametrize("name", sorted(MINDONE_CONFIGS))
def test_mindone_model_configs_are_the_same_architectures(name):
    ours, theirs = load_arch(f"configs/{MINDONE_CONFIGS[name]}"), load_arch(f"configs/{name}")
    a, b = _fields(ours), _fields(theirs)
    if name == "train_dreambooth_sd_v1.yaml":        # MindONE's SD1 DreamBooth text encoder: eps 1e-7
        assert b["text"]["eps"] == 1e-7
        b["text"]["eps"] = a["text"]["eps"]
    assert a == b


def test_train_configs_name_mindones_model_configs():
    for name in os.listdir(os.path.join(ROOT, "configs", "train")):
        with open(os.path.join(ROOT, "configs", "train", name)) as f:
            model_config = yaml.safe_load(f)["model_config"]
        assert os.path.isfile(os.path.join(ROOT, model_config)), (name, model_config)
        if "tiny" not in name:
            assert re.fullmatch(r"configs/train_dreambooth_sd_v[12]\.yaml", model_config)


def _mindone_style(config: str, path) -> str:
    """A tiny config rewritten the way MindONE writes its model configs (FrozenCLIPEmbedder with
    the number of blocks it builds, use_quick_gelu, use_fp16 everywhere, UNet dropout)."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    mp = cfg["model"]["params"]
    text = mp["cond_stage_config"]["params"]
    sd2 = "OpenCLIP" in mp["cond_stage_config"]["target"]
    mp["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {
        "use_fp16": True, "tokenizer_name": "BpeTokenizer", "context_length": 77, "vocab_size": 49408,
        "output_dim": text["width"], "width": text["width"], "heads": text["heads"], "epsilon": "1e-5",
        "layers": text["layers"] - 1 if sd2 else text["layers"], "use_quick_gelu": not sd2}}
    mp.update(use_fp16=True, first_stage_key="image", cond_stage_key="caption")
    mp["unet_config"]["params"].update(use_fp16=True, dropout=0.1)
    mp["first_stage_config"]["params"]["use_fp16"] = True
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    assert _fields(load_arch(str(path))) == _fields(load_arch(config))
    return str(path)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("backend", ["cuda", "ascend"])
def test_text_to_image_with_a_mindone_config(tmp_path, tiny_models, version, backend):
    config = _mindone_style(TINY[version], tmp_path / "mindone.yaml")   # the same architecture (asserted)
    sample(tmp_path, tiny_models[version], config, "--backend", backend, "--n_samples", "1", "--H", "32",
           "--W", "32", "--skip_grid")
    assert (tmp_path / "samples" / "00000.png").exists()


def test_version_flag_picks_mindones_config_and_checkpoint(tmp_path):
    proc = run("text_to_image.py", "-v", "1.5", "--output_path", str(tmp_path), check=False)
    assert_one_line_error(proc, "models/sd_v1.5-d0ab7146.ckpt", "nothing is downloaded")
    proc = run("text_to_image.py", "-v", "2.1-v", "--ckpt_path", os.path.join(ROOT, "configs"),
               "--output_path", str(tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_long_prompts_textual_inversion_and_clip_skip_flags(tmp_path, tiny_models):
    """MindONE's --support_long_prompts and --ti_ckpt_path, and kohya's --clip_skip, as users type
    them; without --support_long_prompts a long prompt is cut with one warning naming the flag."""
    from common.formats.checkpoint_io import save_state_dict
    emb = str(tmp_path / "sksemb.safetensors")
    save_state_dict(emb, {"emb_params": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)})
    long_prompt = "a photo of SKSEMB robot, " + "very " * 100 + "detailed"
    small = ("--H", "32", "--W", "32", "--n_samples", "1", "--sampling_steps", "1", "--prompt", long_prompt)
    proc = sample(tmp_path / "long", tiny_models["v1"], TINY["v1"], *small, "--support_long_prompts", "True",
                  "--ti_ckpt_path", emb, "--clip_skip", "2", "--negative_prompt", "blurry sksemb")
    assert (tmp_path / "long" / "samples" / "00000.png").exists()
    assert "textual inversion: 'sksemb' (2 vectors)" in proc.stderr and "dropped" not in proc.stderr
    proc = sample(tmp_path / "cut", tiny_models["v1"], TINY["v1"], *small)
    warnings = [line for line in proc.stderr.splitlines() if "--support_long_prompts" in line]
    assert len(warnings) == 1 and "the last 34 are dropped" in warnings[0], proc.stderr[-2000:]
    assert_one_line_error(sample(tmp_path, tiny_models["v1"], TINY["v1"], "--ti_ckpt_path", "x.ckpt", check=False),
                          "x.ckpt", "not found")
    assert_one_line_error(sample(tmp_path, tiny_models["v1"], TINY["v1"], "--clip_skip", "4", check=False),
                          "--clip_skip 4", "1 (the model's own layer) to 3")


def test_mindone_flags_grid_and_prompt_file(tmp_path, tiny_models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks robot\na robot on the beach\n")
    sample(tmp_path / "out", tiny_models["v1"], TINY["v1"], "--from-file", str(prompts), "--n_samples", "3",
           "--n_rows", "2", "--H", "32", "--W", "32", "--support_long_prompts", "False", "--jit_level", "O2",
           "--use_parallel", "False")
    assert Image.open(tmp_path / "out" / "grid-0000.png").size == (2 * 32, 3 * 32)    # 6 images, 2 per row


def test_add_watermark_marks_every_saved_image(tmp_path, tiny_models):
    common = ("--n_samples", "1", "--H", "256", "--W", "256", "--sampling_steps", "1", "--skip_grid")
    sample(tmp_path / "plain", tiny_models["v1"], TINY["v1"], *common)
    sample(tmp_path / "marked", tiny_models["v1"], TINY["v1"], *common, "--add_watermark")
    plain, marked = (np.asarray(Image.open(tmp_path / d / "samples" / "00000.png")) for d in ("plain", "marked"))
    assert np.array_equal(marked, watermark.embed(plain))


def test_watermark_round_trip_and_small_images():
    """The mark survives the PNG and is read back; invisible-watermark's own decoder reads it too
    (checked by hand: it needs OpenCV and torch, which CI does not install for this)."""
    from conftest import SUBJECT

    rng = np.random.default_rng(0)
    img = Image.open(os.path.join(SUBJECT, sorted(f for f in os.listdir(SUBJECT) if f.endswith(".png"))[0]))
    img = np.asarray(img.convert("RGB").resize((512, 512), Image.BICUBIC)).astype(float)
    img = (img + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)     # a little texture
    marked = watermark.embed(img)
    assert watermark.extract(marked) == b"StableDiffusion" and watermark.extract(img) != b"StableDiffusion"
    change = np.abs(marked.astype(int) - img)
    assert change.mean() < 1 and change[..., 0].max() == 0      # invisible; R untouched (U channel only)
    assert watermark.embed(img[:128, :128]) is None            # too small to carry the mark


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_converted_ckpt_has_mindones_vae_names_and_old_files_are_rewritten(tmp_path, tiny_models, version):
    import mindspore as ms

    from common.formats import mindspore_layout as ml
    from common.formats.checkpoint_io import load_state_dict, save_mindspore_ckpt

    arch = load_arch(TINY[version])
    new = tmp_path / "new.ckpt"
    run("tools/model_conversion/convert_weights.py", "-s", tiny_models[version], "-t", str(new),
        "--config", TINY[version], "-sv", "pt")
    names = set(ms.load_checkpoint(str(new)))                   # MindSpore itself as the reader
    vae_norms = {k for k in names if k.startswith("first_stage_model.") and re.search(r"norm[^.]*\.\w+$", k)}
    assert vae_norms and all(k.endswith((".gamma", ".beta")) for k in vae_norms)
    assert names == set(ml.mindspore_shapes(arch))
    # a file written before the fix (VAE norms as weight / bias) loads, and --to ms rewrites it
    old_sd = {ml.legacy_vae_norm_name(k) or k: v for k, v in load_state_dict(str(new), keep_bf16=True).items()}
    old = tmp_path / "old.ckpt"
    save_mindspore_ckpt(str(old), old_sd)
    fixed = tmp_path / "fixed.ckpt"
    run("tools/model_conversion/convert_weights.py", "-s", str(old), "-t", str(fixed), "--config", TINY[version],
        "--to", "ms")
    assert new.read_bytes() == fixed.read_bytes()
    back = tmp_path / "back.safetensors"
    run("tools/model_conversion/convert_weights.py", "-s", str(old), "-t", str(back), "--config", TINY[version])
    a, b = load_state_dict(tiny_models[version]), load_state_dict(str(back))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_check_safety_without_its_checkpoint_is_one_line(tmp_path, tiny_models):
    proc = sample(tmp_path, tiny_models["v1"], TINY["v1"], "--check_safety", "--clip_ckpt_path",
                  str(tmp_path / "nowhere.ckpt"), check=False)
    assert_one_line_error(proc, "not found", "nothing is downloaded")
    assert not (tmp_path / "samples").exists()
