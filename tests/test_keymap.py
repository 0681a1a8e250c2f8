"""Weight-name maps: checked against diffusers' own single-file converters (the oracle), live
diffusers / transformers modules, and MindONE's full-size name lists (without allocating)."""
import dataclasses
import os
import re
import warnings

import numpy as np
import pytest
import yaml

from common.arch import load_arch, resolve_config_path
from common.errors import UserError
from common.formats import keymap
from common.formats.keymap import (clip_text_config, diffusers_shapes, diffusers_to_ldm,
                                   diffusers_unet_config, diffusers_vae_config, iter_entries, ldm_shapes,
                                   ldm_to_diffusers, present_parts)

try:                      # the oracle tests need PyTorch + diffusers + transformers; the rest numpy
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch, diffusers and transformers")

TINY = ["configs/tiny-v1-inference.yaml", "configs/tiny-v2-inference.yaml"]
FULL = ["configs/v1-inference.yaml", "configs/v2-inference.yaml"]
# MindONE's full-size name lists (see the README there); override where they live elsewhere.
REF = os.environ.get("MINDONE_NAME_LISTS", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "reference", "mindone"))
needs_ref = pytest.mark.skipif(not os.path.isdir(REF), reason=f"reference name lists not at {REF}")


def random_sd(arch, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32).astype(dtype)
            for k, s in ldm_shapes(arch).items()}


def assert_bit_identical(ours: dict, ref: dict, what: str):
    assert sorted(ours) == sorted(ref), (
        f"{what}: only ours {sorted(set(ours) - set(ref))[:5]}, only ref {sorted(set(ref) - set(ours))[:5]}")
    for k, r in ref.items():
        r = r.numpy() if not isinstance(r, np.ndarray) else r
        o = ours[k]
        assert o.dtype == r.dtype and o.shape == r.shape, f"{what}: {k} {o.dtype}{o.shape} vs {r.dtype}{r.shape}"
        assert o.tobytes() == np.ascontiguousarray(r).tobytes(), f"{what}: {k} values differ"


def assert_same_state_dict(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes(), k


def torch_sd(sd):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def read_names(filename):
    """MindONE list `name#torch.Size([a, b])#dtype` -> {name: shape}."""
    out = {}
    with open(os.path.join(REF, filename)) as f:
        for line in f:
            name, shape, _ = line.strip().split("#")
            out[name] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return out


def strip_text_model(sd):
    return {k[len("text_model."):]: v for k, v in sd.items()}


@pytest.fixture(scope="module", params=TINY, ids=["tiny-v1", "tiny-v2"])
def tiny(request):
    arch = load_arch(request.param)
    return arch, random_sd(arch)


# ------------------------------------------------------------------ oracle: diffusers converters

@needs_torch
def test_matches_diffusers_single_file_converters(tiny):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                     convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel
    arch, sd = tiny
    ours = ldm_to_diffusers(sd, arch)
    ckpt = torch_sd(sd)
    assert_bit_identical(ours["unet"], convert_ldm_unet_checkpoint(ckpt, diffusers_unet_config(arch)), "unet")
    assert_bit_identical(ours["vae"], convert_ldm_vae_checkpoint(ckpt, diffusers_vae_config(arch)), "vae")

    t = arch.text
    if t.kind == "clip":
        ref = convert_ldm_clip_checkpoint(ckpt)
        assert_bit_identical(ours["text_encoder"], ref, "text_encoder")
        assert ours["extras"] == {}
        return
    model = CLIPTextModel(CLIPTextConfig(**clip_text_config(arch)))
    ref = convert_open_clip_checkpoint(model, ckpt, prefix=keymap.OPENCLIP_PREFIX)
    # diffusers drops the unused last OpenCLIP block only by its full-size name (resblocks.23), so
    # for the tiny model it converts that block too: compare the blocks SD runs ...
    unused = {k for k in ref if int(re.search(r"layers\.(\d+)\.", k + "layers.0.").group(1)) >= t.used_layers}
    assert unused and all(f"layers.{t.used_layers}." in k for k in unused)
    assert_bit_identical(ours["text_encoder"], {k: v for k, v in ref.items() if k not in unused}, "text_encoder")
    assert sorted(ours["extras"]) == sorted(
        [k for k in sd if f"resblocks.{t.used_layers}." in k]
        + [keymap.OPENCLIP_PREFIX + "text_projection", keymap.OPENCLIP_PREFIX + "logit_scale"])
    # ... and the unused block too, by mapping it as if it were used.
    all_used = dataclasses.replace(arch, text=dataclasses.replace(t, used_layers=t.layers))
    ours_all = ldm_to_diffusers(sd, all_used)
    assert_bit_identical(ours_all["text_encoder"], ref, "text_encoder (all blocks)")


@needs_torch
def test_configs_match_diffusers_single_file_configs():
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    for cfg in TINY + FULL:
        arch = load_arch(cfg)
        with open(resolve_config_path(cfg)) as f:
            original = yaml.safe_load(f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_u = create_unet_diffusers_config_from_ldm(original, {}, image_size=arch.image_size)
            ref_v = create_vae_diffusers_config_from_ldm(original, {}, image_size=arch.image_size)
        ours_u, ours_v = diffusers_unet_config(arch), diffusers_vae_config(arch)
        for k in ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
                  "block_out_channels", "layers_per_block", "cross_attention_dim",
                  "attention_head_dim", "use_linear_projection", "transformer_layers_per_block"):
            assert ours_u[k] == ref_u[k], (cfg, k, ours_u[k], ref_u[k])
        for k, v in ref_v.items():
            assert ours_v[k] == v, (cfg, k, ours_v[k], v)
        assert ours_u["norm_num_groups"] == ours_v["norm_num_groups"] == arch.unet.norm_num_groups


@needs_torch
def test_converted_weights_load_strictly_into_live_models(tiny):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    arch, sd = tiny
    parts = ldm_to_diffusers(sd, arch)
    unet = UNet2DConditionModel(**diffusers_unet_config(arch))
    unet.load_state_dict(torch_sd(parts["unet"]), strict=True)      # also checks every shape
    vae = AutoencoderKL(**diffusers_vae_config(arch))
    vae.load_state_dict(torch_sd(parts["vae"]), strict=True)
    text = CLIPTextModel(CLIPTextConfig(**clip_text_config(arch)))
    # transformers 5 has no `text_model.` level in live names (its loader accepts files with it)
    live = strip_text_model(parts["text_encoder"]) if "embeddings.token_embedding.weight" in text.state_dict() \
        else parts["text_encoder"]
    text.load_state_dict(torch_sd(live), strict=True)
    assert torch.equal(text.state_dict()["final_layer_norm.weight" if live is not parts["text_encoder"]
                                         else "text_model.final_layer_norm.weight"],
                       torch.from_numpy(parts["text_encoder"]["text_model.final_layer_norm.weight"]))
    assert text.config.num_hidden_layers == arch.text.used_layers


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_is_bit_exact(tiny, dtype):
    arch, sd = tiny
    sd = {k: v.astype(dtype) for k, v in sd.items()}
    parts = ldm_to_diffusers(sd, arch)
    assert all(v.dtype == dtype for comp in parts.values() for v in comp.values())
    assert_same_state_dict(diffusers_to_ldm(parts, arch), sd)
    # transformers 5 writes text encoder files without `text_model.`: accepted too
    parts["text_encoder"] = strip_text_model(parts["text_encoder"])
    assert_same_state_dict(diffusers_to_ldm(parts, arch), sd)


def test_sd2_without_optional_tensors(tiny):
    arch, sd = tiny
    if arch.text.kind != "openclip":
        pytest.skip("SD2 only")
    optional = {e.ldm for e in iter_entries(arch) if e.optional}
    slim = {k: v for k, v in sd.items() if k not in optional}
    parts = ldm_to_diffusers(slim, arch)          # e.g. a file written by diffusers' own script
    assert parts["extras"] == {}
    assert_same_state_dict(diffusers_to_ldm(parts, arch), slim)


def test_tolerated_variants_of_the_original_layout(tiny):
    arch, sd = tiny
    base = ldm_to_diffusers(sd, arch)
    variant = dict(sd)
    variant["betas"] = np.zeros(1000, np.float32)
    variant["alphas_cumprod"] = np.zeros(1000, np.float32)
    variant["model_ema.decay"] = np.array(0.9999, np.float32)
    if arch.text.kind == "clip":
        # older transformers had no `text_model.` level; position_ids is a buffer
        variant = {k.replace("transformer.text_model.", "transformer."): v for k, v in variant.items()}
        variant["cond_stage_model.transformer.embeddings.position_ids"] = np.arange(77)[None]
    out = ldm_to_diffusers(variant, arch)
    for comp in base:
        assert_same_state_dict(out[comp], base[comp])


def test_ema_weights(tiny):
    arch, sd = tiny
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1
           for k, v in sd.items() if k.startswith(keymap.UNET_PREFIX)}
    out = ldm_to_diffusers({**sd, **ema}, arch, ema=True)
    plain = ldm_to_diffusers(sd, arch)
    assert np.array_equal(out["unet"]["conv_in.weight"], plain["unet"]["conv_in.weight"] + 1)
    assert_same_state_dict(out["vae"], plain["vae"])
    with pytest.raises(UserError, match="EMA"):
        ldm_to_diffusers(sd, arch, ema=True)


def test_partial_checkpoints(tiny):
    arch, sd = tiny
    unet_only = {k: v for k, v in sd.items() if k.startswith(keymap.UNET_PREFIX)}
    assert present_parts(unet_only) == ("unet",)
    assert present_parts(sd) == ("unet", "vae", "text_encoder")
    with pytest.raises(UserError, match="lacks the whole vae/text_encoder"):
        ldm_to_diffusers(unet_only, arch)
    parts = ldm_to_diffusers(unet_only, arch, parts=("unet",))
    assert set(parts) == {"unet", "extras"}
    assert_same_state_dict(diffusers_to_ldm(parts, arch), unet_only)
    # a full checkpoint converted part-wise: other parts are skipped, not errors
    assert set(ldm_to_diffusers(sd, arch, parts=("vae",))["vae"]) == set(diffusers_shapes(arch)["vae"])
    with pytest.raises(UserError, match="unknown model part"):
        ldm_to_diffusers(sd, arch, parts=("controlnet",))


def test_errors_name_the_tensors(tiny):
    arch, sd = tiny
    extra = dict(sd, **{"model.diffusion_model.bogus.weight": np.zeros(1, np.float32)})
    with pytest.raises(UserError, match="bogus"):
        ldm_to_diffusers(extra, arch)
    missing = dict(sd)
    del missing["model.diffusion_model.out.2.weight"]
    with pytest.raises(UserError, match=r"out\.2\.weight"):
        ldm_to_diffusers(missing, arch)
    bad_shape = dict(sd, **{"first_stage_model.quant_conv.bias": np.zeros(3, np.float32)})
    with pytest.raises(UserError, match="quant_conv.bias"):
        ldm_to_diffusers(bad_shape, arch)
    parts = ldm_to_diffusers(sd, arch)
    parts["unet"]["nonsense"] = parts["unet"]["conv_in.bias"]
    with pytest.raises(UserError, match="nonsense"):
        diffusers_to_ldm(parts, arch)
    del parts["unet"]["nonsense"], parts["unet"]["conv_in.bias"]
    with pytest.raises(UserError, match="conv_in.bias"):
        diffusers_to_ldm(parts, arch)


def test_wrong_config_for_checkpoint():
    v1, v2 = load_arch(TINY[0]), load_arch(TINY[1])
    with pytest.raises(UserError):
        ldm_to_diffusers(random_sd(v1), v2)
    with pytest.raises(UserError):
        ldm_to_diffusers(random_sd(v2), v1)


def test_legacy_diffusers_vae_attention_names(tiny):
    arch, sd = tiny
    parts = ldm_to_diffusers(sd, arch, parts=("vae",))
    legacy = {}
    for k, v in parts["vae"].items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert legacy.keys() != parts["vae"].keys()
    assert_same_state_dict(diffusers_to_ldm({"vae": legacy}, arch), diffusers_to_ldm(parts, arch))


# ------------------------------------------------------------------ full size, no allocation

LEGACY_VAE_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@needs_ref
def test_full_size_original_names_match_mindone_lists():
    v1 = ldm_shapes(load_arch(FULL[0]))
    assert v1 == read_names("pt_names_v1.txt")   # incl. shapes; position_ids is in neither
    arch = load_arch(FULL[1])
    v2, ref = ldm_shapes(arch), read_names("pt_names_v2.txt")
    # MindONE's SD2 list was exported from a 23-block text encoder (what SD runs), without the
    # unused 24th OpenCLIP block, text_projection and logit_scale; those are our optional entries.
    allowed = {f"cond_stage_model.model.transformer.resblocks.23.{s}" for s in (
        "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.in_proj_weight",
        "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_fc.weight",
        "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
    allowed |= {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    assert set(ref) <= set(v2)
    assert set(v2) - set(ref) == allowed
    assert allowed == {e.ldm for e in iter_entries(arch) if e.optional}
    assert {k: v2[k] for k in ref} == ref
    assert v2["cond_stage_model.model.text_projection"] == (1024, 1024)
    assert v2["cond_stage_model.model.logit_scale"] == ()


@needs_ref
def test_full_size_diffusers_names_match_reference_lists():
    shapes = diffusers_shapes(load_arch(FULL[1]))
    assert shapes["unet"] == read_names("diffusers_unet_v2.txt")
    assert shapes["text_encoder"] == read_names("diffusers_clip_v2.txt")
    # the VAE list predates diffusers 0.14, which renamed the mid attention (still read as legacy)
    legacy = {}
    for k, s in shapes["vae"].items():
        for new, old in LEGACY_VAE_NAMES.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = s
    assert legacy == read_names("diffusers_vae_v2.txt")


@needs_torch
@pytest.mark.parametrize("cfg", FULL, ids=["v1", "v2"])
def test_full_size_names_match_meta_models(cfg):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    arch = load_arch(cfg)
    shapes = diffusers_shapes(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(arch))
        vae = AutoencoderKL(**diffusers_vae_config(arch))
        text = CLIPTextModel(CLIPTextConfig(**clip_text_config(arch)))
    for model, comp in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        live = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        ours = shapes[comp]
        if comp == "text_encoder" and "embeddings.token_embedding.weight" in live:
            ours = strip_text_model(ours)
        assert live == ours, (comp, sorted(set(live) ^ set(ours))[:6])
    assert len(shapes["unet"]) == 686
