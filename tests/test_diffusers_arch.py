"""The architecture of a diffusers folder from its config files (common.formats.diffusers_arch):
round trips through this project's own folder writer, diffusers' / transformers' own classes as the
outside oracle for the official SD 1.5 / 2.x configs, and one-line errors for what SD 1.x / 2.x
cannot represent."""
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from common.arch import load_arch, parse_arch, resolve_config_path
from common.diffusion.schedule import NoiseSchedule
from common.errors import UserError
from common.formats import checkpoint_io as cio, keymap
from common.formats.diffusers_arch import arch_from_diffusers, ldm_config_from_diffusers
from common.formats.init_weights import random_weights

try:                      # the oracle tests need PyTorch + diffusers + transformers; the rest numpy
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch, diffusers and transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["tiny-v1", "tiny-v2"]
SMALL = TINY + ["mid-v1"] + (["mid-v2"] if os.path.isfile(os.path.join(ROOT, "configs", "mid-v2-inference.yaml")) else [])
FULL = ["v1", "v2", "v2-vpred"]
NO_WEIGHTS = {"unet": {}, "vae": {}, "text_encoder": {}}     # the writer's configs come from the arch alone


def yaml_path(name):
    return resolve_config_path(f"configs/{name}-inference.yaml")


def same_arch(got, want, folder):
    # `path` is where the architecture came from: the yaml for load_arch, the folder here (error
    # messages name it). Everything else must be equal.
    assert got.path == str(folder)
    assert dataclasses.replace(got, path=want.path) == want


def write_folder(folder, arch, weights=False, extras=True):
    """This project's writer (tools/model_conversion/convert_weights.py --to diffusers)."""
    if weights:
        parts = keymap.ldm_to_diffusers(random_weights(arch, seed=0), arch)
        if not extras:
            parts.pop("extras")
    else:
        parts = NO_WEIGHTS
    cio.save_diffusers_folder(str(folder), parts, arch)
    return folder


def edit_json(path, **changes):
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


DELETE = object()


# ------------------------------------------------------------------ round trips through our writer

@pytest.mark.parametrize("name", SMALL)
def test_round_trip_small_configs(name, tmp_path):
    arch = load_arch(yaml_path(name))
    tiny = name in TINY                   # real (random) weights for the tiny ones; mid: configs only
    folder = write_folder(tmp_path / name, arch, weights=tiny)
    got = arch_from_diffusers(str(folder))
    same_arch(got, arch, folder)
    if tiny:                              # and the weights load back with the derived architecture
        back = keymap.diffusers_to_ldm(cio.load_diffusers_folder(str(folder)), got)
        assert set(back) == set(keymap.ldm_shapes(arch))


@pytest.mark.parametrize("name", FULL)
def test_round_trip_full_size_configs(name, tmp_path):
    arch = load_arch(yaml_path(name))
    folder = write_folder(tmp_path / name, arch)
    same_arch(arch_from_diffusers(str(folder)), arch, folder)


def test_ldm_config_dict_is_what_parse_arch_takes(tmp_path):
    arch = load_arch(yaml_path("tiny-v2"))
    folder = write_folder(tmp_path / "f", arch)
    cfg = ldm_config_from_diffusers(str(folder))
    yaml.safe_dump(cfg)                   # plain data: can be written out as an inference yaml
    assert dataclasses.replace(parse_arch(cfg, "x"), path=arch.path) == arch


def _variant(name, edit):
    with open(yaml_path(name)) as f:
        cfg = yaml.safe_load(f)
    edit(cfg["model"]["params"]["cond_stage_config"]["params"])
    return parse_arch(cfg, where=f"{name}-variant")


def test_clip_penultimate_and_openclip_projection_come_back_from_the_extras(tmp_path):
    # An SD1-style config stopping at the penultimate CLIP block: the folder keeps the last block
    # in ldm_extras.safetensors, which is how the reader counts it back.
    clip_pen = _variant("tiny-v1", lambda p: p.update(layer="penultimate"))
    assert (clip_pen.text.layers, clip_pen.text.used_layers) == (3, 2)
    folder = write_folder(tmp_path / "clip_pen", clip_pen, weights=True)
    same_arch(arch_from_diffusers(str(folder)), clip_pen, folder)
    # OpenCLIP with a text_projection narrower than the width (CLIPTextModel has no projection;
    # only the extras file knows it)
    proj = _variant("tiny-v2", lambda p: p.update(embed_dim=16))
    assert proj.text.projection_dim == 16
    folder = write_folder(tmp_path / "proj", proj, weights=True)
    same_arch(arch_from_diffusers(str(folder)), proj, folder)


@pytest.mark.parametrize("name", TINY)
def test_encoder_kind_without_extras_or_our_pad_ids(name, tmp_path):
    """CLIP (SD1) or OpenCLIP (SD2) when neither our extras nor our pad ids say it: official folders
    carry transformers' default ids (pad 1, bos 0, eos 2); the activation, or a tokenizer, tells."""
    arch = load_arch(yaml_path(name))
    folder = write_folder(tmp_path / name, arch, weights=True, extras=False)
    assert not os.path.exists(folder / cio.EXTRAS_FILE)
    same_arch(arch_from_diffusers(str(folder)), arch, folder)
    edit_json(folder / "text_encoder" / "config.json", pad_token_id=1, bos_token_id=0, eos_token_id=2)
    same_arch(arch_from_diffusers(str(folder)), arch, folder)
    # a tokenizer's pad token is what the pipeline pads with: it decides over the activation
    os.makedirs(folder / "tokenizer")
    other = "<|endoftext|>" if arch.text.kind == "openclip" else "!"
    with open(folder / "tokenizer" / "special_tokens_map.json", "w") as f:
        json.dump({"pad_token": {"content": other, "lstrip": False}}, f)
    flipped = arch_from_diffusers(str(folder))
    assert flipped.text.kind != arch.text.kind and flipped.text.used_layers == arch.text.used_layers


# ------------------------------------------------------------------ official configs (outside oracle)

_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3


def official_configs(model):
    """The public configs of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
    (768-v) and stabilityai/stable-diffusion-2-base, as diffusers / transformers wrote them."""
    v1 = model == "sd15"
    unet = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8 if v1 else [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768 if v1 else 1024, "down_block_types": _SD_DOWN,
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 96 if model == "sd21v" else 64, "up_block_types": _SD_UP}
    if not v1:
        unet.update(dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
                    use_linear_projection=True)
        if model == "sd21v":
            unet["upcast_attention"] = True        # SD 2.1's own config asks for float32 attention
    vae = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
           "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
           "out_channels": 3, "sample_size": 768 if model == "sd21v" else 512,
           "up_block_types": ["UpDecoderBlock2D"] * 4}
    if not v1:
        vae["scaling_factor"] = 0.18215            # SD1.5's file predates the key (diffusers' default)
    text = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
            "dropout": 0.0, "eos_token_id": 2, "initializer_factor": 1.0, "initializer_range": 0.02,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
            "pad_token_id": 1, "torch_dtype": "float32", "vocab_size": 49408}
    if v1:    # OpenAI CLIP ViT-L/14
        text.update(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                    num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
    else:     # OpenCLIP ViT-H/14 without its last block (SD2 reads the penultimate one)
        text.update(hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                    num_attention_heads=16, num_hidden_layers=23, projection_dim=512)
    sched = {"_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    if v1:
        sched["_class_name"] = "PNDMScheduler"
    else:
        sched.update(_class_name="DDIMScheduler",
                     prediction_type="v_prediction" if model == "sd21v" else "epsilon")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.8.0",
             "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if v1 else [None, None],
             "scheduler": ["diffusers", sched["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    pad = "<|endoftext|>" if v1 else "!"
    tokens = {"bos_token": {"content": "<|startoftext|>"}, "eos_token": {"content": "<|endoftext|>"},
              "pad_token": pad, "unk_token": {"content": "<|endoftext|>"}}
    return {"unet/config.json": unet, "vae/config.json": vae, "text_encoder/config.json": text,
            "scheduler/scheduler_config.json": sched, "model_index.json": index,
            "tokenizer/special_tokens_map.json": tokens}


def write_configs(folder, files):
    for rel, cfg in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)) or folder, exist_ok=True)
        with open(os.path.join(folder, rel), "w") as f:
            json.dump(cfg, f, indent=2)
    return folder


OFFICIAL = {"sd15": "v1", "sd21v": "v2-vpred", "sd2base": "v2"}


@pytest.mark.parametrize("model", list(OFFICIAL))
def test_official_configs_give_the_ldm_yaml(model, tmp_path):
    folder = write_configs(str(tmp_path / model), official_configs(model))
    same_arch(arch_from_diffusers(folder), load_arch(yaml_path(OFFICIAL[model])), folder)
    # without the tokenizer and model_index.json too (the activation tells CLIP from OpenCLIP)
    os.remove(os.path.join(folder, "model_index.json"))
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    same_arch(arch_from_diffusers(folder), load_arch(yaml_path(OFFICIAL[model])), folder)


def strip_text_model(shapes):
    return {k[len("text_model."):]: v for k, v in shapes.items()}


@needs_torch
@pytest.mark.parametrize("model", ["sd15", "sd21v"])
def test_diffusers_builds_what_the_derived_arch_predicts(model, tmp_path):
    """diffusers / transformers read the same files (on the meta device: no weights allocated) and
    build exactly the tensors the derived architecture names; the scheduler's betas and prediction
    type are the derived schedule's."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = write_configs(str(tmp_path / model), official_configs(model))
    arch = arch_from_diffusers(folder)
    shapes = keymap.diffusers_shapes(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(folder, "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(folder, "vae")))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder")))
    for live_model, comp in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        live = {k: tuple(v.shape) for k, v in live_model.state_dict().items()}
        ours = shapes[comp]
        if comp == "text_encoder":
            live.pop("text_model.embeddings.position_ids", None)
            live.pop("embeddings.position_ids", None)
            if "embeddings.token_embedding.weight" in live:      # transformers 5: no text_model. level
                ours = strip_text_model(ours)
        assert live == ours, (comp, sorted(set(live) ^ set(ours))[:6])
    # shapes do not show the head split (attention_head_dim is a head COUNT): the live modules do
    u = arch.unet
    live_heads = {level: block.attentions[0].transformer_blocks[0].attn1.heads
                  for level, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")}
    assert live_heads == {level: u.heads(level) for level in range(u.levels) if u.has_attention(level)}
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == u.heads(u.levels - 1)
    assert {u.head_dim(level) for level in live_heads} == ({40, 80, 160} if model == "sd15" else {64})
    assert unet.config.sample_size == arch.latent_size
    assert vae.config.scaling_factor == arch.scale_factor
    assert text.config.num_hidden_layers == arch.text.used_layers

    cls = getattr(diffusers, official_configs(model)["scheduler/scheduler_config.json"]["_class_name"])
    sched = cls.from_pretrained(folder, subfolder="scheduler")
    ours = NoiseSchedule(arch.schedule)
    np.testing.assert_allclose(sched.betas.double().numpy(), ours.betas, rtol=1e-6, atol=0)
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), ours.alphas_cumprod, rtol=1e-5)
    assert {"epsilon": "eps", "v_prediction": "v"}[sched.config.prediction_type] == arch.schedule.parameterization


# ------------------------------------------------------------------ errors

def sdxl_unet():
    unet = copy.deepcopy(official_configs("sd2base")["unet/config.json"])
    unet.update(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                projection_class_embeddings_input_dim=2816, sample_size=128,
                transformer_layers_per_block=[1, 2, 10])
    return unet


@pytest.fixture
def folder(tmp_path):
    """A tiny SD2 folder written by our writer (configs only), to break in one place per test."""
    return str(write_folder(tmp_path / "model", load_arch(yaml_path("tiny-v2"))))


def expect_error(folder, *fragments):
    with pytest.raises(UserError) as e:
        arch_from_diffusers(folder)
    msg = str(e.value)
    assert "\n" not in msg and folder in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_sdxl_is_refused(tmp_path):
    files = official_configs("sd2base")
    files["unet/config.json"] = sdxl_unet()
    files["model_index.json"].update(_class_name="StableDiffusionXLPipeline",
                                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    folder = write_configs(str(tmp_path / "sdxl"), files)
    expect_error(folder, "model_index.json", "SDXL")
    os.remove(os.path.join(folder, "model_index.json"))              # the UNet alone gives it away
    expect_error(folder, "unet/config.json", "addition_embed_type", "text_time", "SDXL")


@pytest.mark.parametrize("rel", ["unet/config.json", "vae/config.json", "text_encoder/config.json",
                                 "scheduler/scheduler_config.json"])
def test_missing_config_file(folder, rel):
    os.remove(os.path.join(folder, rel))
    expect_error(folder, rel, "missing")


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2", DELETE])
def test_only_scaled_linear_schedules(folder, schedule):
    edit_json(os.path.join(folder, "scheduler", "scheduler_config.json"), beta_schedule=schedule)
    msg = expect_error(folder, "scheduler/scheduler_config.json", "beta_schedule", "scaled_linear")
    if schedule is DELETE:
        assert "default" in msg


BREAKS = [
    ("scheduler/scheduler_config.json", dict(prediction_type="sample"), "prediction_type"),
    ("scheduler/scheduler_config.json", dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    ("scheduler/scheduler_config.json", dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    ("unet/config.json", dict(time_cond_proj_dim=256), "LCM"),
    ("unet/config.json", dict(class_embed_type="timestep"), "class_embed_type"),
    ("unet/config.json", dict(num_attention_heads=8), "num_attention_heads"),
    ("unet/config.json", dict(_class_name="UNet2DModel"), "_class_name"),
    ("unet/config.json", dict(attention_head_dim=[2, 3, 4]), "attention_head_dim"),
    ("unet/config.json", dict(transformer_layers_per_block=[1, 2, 2]), "transformer_layers_per_block"),
    ("unet/config.json", dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 3), "SimpleCrossAttnDownBlock2D"),
    ("unet/config.json", dict(up_block_types=["CrossAttnUpBlock2D"] * 3), "up_block_types"),
    ("unet/config.json", dict(sample_size=DELETE), "sample_size"),
    ("vae/config.json", dict(latents_mean=[0.0] * 4), "latents_mean"),
    ("vae/config.json", dict(_class_name="AutoencoderTiny"), "AutoencoderTiny"),
    ("text_encoder/config.json", dict(hidden_act="relu"), "hidden_act"),
    ("text_encoder/config.json", dict(hidden_size=64), "context_dim"),       # parse_arch's own check
]


@pytest.mark.parametrize("rel,changes,fragment", BREAKS, ids=[f"{r.split('/')[0]}-{next(iter(c))}" for r, c, _ in BREAKS])
def test_unrepresentable_settings(folder, rel, changes, fragment):
    edit_json(os.path.join(folder, rel), **changes)
    expect_error(folder, fragment)


def test_broken_json_and_not_a_folder(folder, tmp_path):
    expect_error(str(tmp_path / "nowhere"), "not a folder")
    with open(os.path.join(folder, "vae", "config.json"), "w") as f:
        f.write("{ nope")
    expect_error(folder, "vae/config.json", "not readable JSON")


def test_imports_no_torch():
    code = ("import sys; import common.formats.diffusers_arch; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'mindspore') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
