"""Community adapter files: kohya / LyCORIS LoRA, LoCon, LoHa, LoKr, full diff and DoRA, in the
kohya, diffusers and PEFT namings, merged into the weights once for both backends.

Oracles from outside: diffusers' own `load_lora_weights` + `fuse_lora` on kohya files with every
kind of layer (FF, proj_in/out, text-encoder MLP, LoCon convs), peft's own LoHa / LoKr / DoRA
layers for those update rules."""
import logging

import numpy as np
import pytest
import torch

from conftest import TINY
from common.arch import load_arch
from common.errors import UserError
from common.formats import keymap, lora as lora_fmt
from common.formats.adapters import LohaPair, LokrPair, LoraPair, apply
from common.formats.checkpoint_io import load_state_dict, save_state_dict


def community_lora(arch, layers="all", seed=3, text_encoder=True, alpha=None):
    """A LoRA / LoCon as civitai users download them: non-zero ups, a rank per layer, an alpha per layer
    (or `alpha` for all)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (target, layer) in enumerate(sorted(lora_fmt.lora_targets(arch, True, text_encoder, layers).items())):
        rank = 2 + i % 3
        kernel = tuple(layer.shape[2:])
        out[target] = LoraPair(down=rng.standard_normal((rank, layer.fan_in) + kernel).astype(np.float32) * 0.3,
                               up=rng.standard_normal((layer.fan_out, rank) + (1,) * len(kernel)).astype(np.float32) * 0.3,
                               alpha=alpha if alpha is not None else float(1 + i % 4))
    return out


def diffusers_pipeline(arch, weights):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from backends.cuda.models import load_models
    unet, vae, text, _ = load_models(arch, weights)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def torch_state(unet, text_encoder) -> dict:
    sd = {**{"unet." + k: v for k, v in unet.state_dict().items()},
          **{"text_encoder." + k: v for k, v in text_encoder.state_dict().items()}}
    return {k.replace(".base_layer", ""): v.float().numpy() for k, v in sd.items() if "lora_" not in k}


def ours_as_diffusers(weights, arch) -> dict:
    from backends.cuda.models import load_models
    unet, _, text, _ = load_models(arch, weights)
    return torch_state(unet, text)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("fmt,name", [(lora_fmt.to_kohya, lora_fmt.KOHYA_WEIGHT_NAME),
                                      (lora_fmt.to_diffusers, lora_fmt.DIFFUSERS_WEIGHT_NAME)])
def test_diffusers_fuses_every_layer_kind_as_we_merge(tmp_path, tiny_models, version, fmt, name):
    """FF, proj_in/out (1x1 conv on SD1, linear on SD2), text-encoder MLP and attention, LoCon 3x3
    convs, time_emb_proj, conv_shortcut, down/upsamplers, conv_in/out: diffusers' loader and ours agree.
    One alpha for the file (ranks vary): diffusers 0.42 drops per-layer alphas of kohya attention
    layers (its alpha_pattern keys keep the old processor names), A1111 / ComfyUI / we apply them."""
    arch = load_arch(TINY[version])
    lora = community_lora(arch, alpha=1.5)
    kinds = {t.rsplit(".", 1)[-1] for t in lora}
    assert {"proj_in", "fc1", "fc2", "conv1", "conv_shortcut", "time_emb_proj", "conv"} <= kinds
    save_state_dict(str(tmp_path / name), fmt(lora), metadata={"format": "pt"})
    weights = load_state_dict(tiny_models[version])
    pipe = diffusers_pipeline(arch, weights)
    pipe.load_lora_weights(str(tmp_path), weight_name=name)
    pipe.fuse_lora(lora_scale=0.8)
    theirs = torch_state(pipe.unet, pipe.text_encoder)
    ours = ours_as_diffusers(lora_fmt.merge_loras(weights, arch, [(lora, 0.8)]), arch)
    base = ours_as_diffusers(weights, arch)
    assert set(theirs) == set(ours)
    changed = [k for k in ours if not np.array_equal(ours[k], base[k])]
    assert len(changed) == len(lora)                       # every adapted layer, nothing else
    assert max(float(np.abs(theirs[k] - ours[k]).max()) for k in ours) < 1e-6


def test_kohya_ldm_names_and_old_diffusers_names_read_the_same(tiny_models):
    """kohya files naming UNet layers by the original LDM paths, and diffusers' attention-processor
    names, are the same layers."""
    arch = load_arch(TINY["v1"])
    lora = community_lora(arch, "attention")
    ldm = {}
    for key, value in lora_fmt.to_kohya(lora).items():
        name, _, tensor = key.partition(".")
        target = next(t for t in lora if lora_fmt.kohya_name(t) == name)
        if target.startswith("unet:"):
            layer = lora_fmt.adaptable_layers(arch)[target]
            name = "lora_unet_" + layer.ldm[len(keymap.UNET_PREFIX):-len(".weight")].replace(".", "_")
        ldm[f"{name}.{tensor}"] = value
    old = {}
    for key, value in lora_fmt.to_diffusers(lora).items():
        key = key.replace(".lora.down.", "_lora.down.").replace(".lora.up.", "_lora.up.")
        for attn in ("attn1", "attn2"):
            key = key.replace(f".{attn}.", f".{attn}.processor.")
        key = key.replace("to_out.0_lora", "to_out_lora")
        if key.startswith("unet."):
            old[key] = value
    for sd, targets in ((ldm, set(lora)), (old, {t for t in lora if t.startswith("unet:")})):
        back = lora_fmt.from_state_dict(sd, arch)
        assert set(back) == targets
        for t in targets:
            np.testing.assert_allclose(back[t].delta(), lora[t].delta(), rtol=1e-6, atol=1e-6)


def _peft_layer(kind, module, **config):
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    cls = {"loha": LoHaConfig, "lokr": LoKrConfig, "dora": LoraConfig}[kind]
    extra = {"use_dora": True} if kind == "dora" else {}
    model = inject_adapter_in_model(cls(target_modules=["layer"], **config, **extra), module)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "base_layer" not in n and "magnitude" not in n:
                p.copy_(torch.randn_like(p) * 0.5)
    return model.layer


class _Net(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


def _params(layer, prefix):
    return {n[len(prefix):].split(".")[0]: p.detach().numpy() for n, p in layer.named_parameters()
            if n.startswith(prefix)}


@pytest.mark.parametrize("base", ["linear", "conv", "conv_tucker"])
def test_loha_update_equals_peft(base):
    torch.manual_seed(1)
    module = torch.nn.Linear(12, 20) if base == "linear" else torch.nn.Conv2d(6, 10, 3, padding=1)
    layer = _peft_layer("loha", _Net(module), r=4, alpha=3.0, use_effective_conv2d=base == "conv_tucker")
    p = _params(layer, "hada_")
    loha = LohaPair(w1_a=p["w1_a"], w1_b=p["w1_b"], w2_a=p["w2_a"], w2_b=p["w2_b"], alpha=3.0,
                    t1=p.get("t1"), t2=p.get("t2"))
    assert (loha.t1 is not None) == (base == "conv_tucker")
    theirs = layer.get_delta_weight("default").detach().numpy()
    np.testing.assert_allclose(loha.delta(1.0, theirs.shape), theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["linear", "conv"])
def test_lokr_update_equals_peft(base):
    """A LoKr with w1 whole and w2 decomposed (what peft and LyCORIS build at a small rank): both
    scale by alpha / rank."""
    torch.manual_seed(2)
    module = torch.nn.Linear(16, 24) if base == "linear" else torch.nn.Conv2d(8, 12, 3, padding=1)
    layer = _peft_layer("lokr", _Net(module), r=2 if base == "linear" else 1, alpha=3.0, decompose_factor=4)
    p = _params(layer, "lokr_")
    lokr = LokrPair(**{k: v for k, v in p.items()}, alpha=3.0)
    assert lokr.w2 is None and lokr.w2_a is not None
    theirs = layer.get_delta_weight("default").detach().numpy()
    np.testing.assert_allclose(lokr.delta(1.0, theirs.shape), theirs, rtol=1e-5, atol=1e-6)


def test_dora_merge_equals_peft():
    """kohya / LyCORIS `dora_scale` [out, 1] is peft's lora_magnitude_vector: same merged weight."""
    torch.manual_seed(3)
    layer = _peft_layer("dora", _Net(torch.nn.Linear(12, 20)), r=4, lora_alpha=2.0)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    weight = layer.base_layer.weight.detach().numpy().copy()
    pair = LoraPair(down=layer.lora_A["default"].weight.detach().numpy(),
                    up=layer.lora_B["default"].weight.detach().numpy(), alpha=2.0,
                    dora_scale=layer.lora_magnitude_vector["default"].weight.detach().numpy().reshape(-1, 1))
    layer.merge()
    np.testing.assert_allclose(apply(weight, pair, 1.0), layer.base_layer.weight.detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(apply(weight, pair, 0.0), weight)       # strength 0: the base model


def lycoris_files(arch, seed=5):
    """LoHa (incl. Tucker on a 3x3 conv), LoKr (both factor forms) and full-diff layers, as LyCORIS
    names them, with their expected updates."""
    rng = np.random.default_rng(seed)
    layers = lora_fmt.adaptable_layers(arch)
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.3          # noqa: E731
    ff = next(t for t in layers if t.endswith("ff.net.2"))
    conv = next(t for t in layers if t.endswith("resnets.0.conv1"))
    te = next(t for t in layers if t.endswith("mlp.fc1"))
    attn = next(t for t in layers if t.endswith("attn2.to_k"))
    (o, i), (co, ci, k, _) = layers[ff].shape, layers[conv].shape
    loha = {ff: LohaPair(r(o, 4), r(4, i), r(o, 4), r(4, i), alpha=2.0),
            conv: LohaPair(r(4, co), r(4, ci), r(4, co), r(4, ci), alpha=4.0, t1=r(4, 4, k, k), t2=r(4, 4, k, k))}
    to, ti = layers[te].shape
    lokr = {te: LokrPair(w1=r(2, 2), w2_a=r(to // 2, 2), w2_b=r(2, ti // 2), alpha=1.0),
            conv: LokrPair(w1_a=r(2, 1), w1_b=r(1, 2), w2=r(co // 2, ci // 2, k, k), alpha=8.0)}
    full = {attn: lora_fmt.FullDiff(r(*layers[attn].shape))}
    return loha, lokr, full


def test_lycoris_files_read_and_merge(tiny_models):
    arch = load_arch(TINY["v1"])
    weights = load_state_dict(tiny_models["v1"])
    layers = lora_fmt.adaptable_layers(arch)
    for adapters in lycoris_files(arch):
        sd = lora_fmt.to_kohya(adapters)
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
        back = lora_fmt.from_state_dict({k: v.astype(np.float16) if v.ndim else v for k, v in sd.items()}, arch)
        merged = lora_fmt.merge_loras(weights, arch, [(back, 0.5)])
        for target, adapter in adapters.items():
            layer = layers[target]
            want = np.asarray(weights[layer.ldm], np.float32) + adapter.delta(0.5, layer.shape)
            np.testing.assert_allclose(merged[layer.ldm], want, rtol=1e-3, atol=1e-3)   # fp16 file
    # a LoKr whose w1 is decomposed and w2 whole: scaled by alpha / rank of w1_b
    _, lokr, _ = lycoris_files(arch)
    conv = next(a for a in lokr.values() if a.w2 is not None)
    assert conv.rank == 1 and np.allclose(conv.delta(1.0), np.kron((conv.w1_a @ conv.w1_b)[:, :, None, None], conv.w2) * 8.0)


def test_stacked_loras_add_up_in_order(tiny_models):
    arch = load_arch(TINY["v2"])
    weights = load_state_dict(tiny_models["v2"])
    a, b = community_lora(arch, "kohya", seed=1), community_lora(arch, "all", seed=2)
    both = lora_fmt.merge_loras(weights, arch, [(a, 0.8), (b, 0.5)])
    one = lora_fmt.merge_loras(lora_fmt.merge_loras(weights, arch, [(a, 0.8)]), arch, [(b, 0.5)])
    assert set(both) == set(weights)
    for k in both:
        np.testing.assert_array_equal(both[k], one[k])
    qkv = lora_fmt.adaptable_layers(arch)["text_encoder:encoder.layers.0.self_attn.k_proj"]
    assert qkv.rows is not None                         # SD2's fused in_proj: one slice of it
    zero = lora_fmt.merge_loras(weights, arch, [(a, 0.0)])
    assert all(np.array_equal(zero[k], weights[k]) for k in weights)


def test_unknown_keys_are_listed_and_unused_layers_skipped(tiny_models, caplog):
    arch = load_arch(TINY["v2"])
    sd = lora_fmt.to_kohya(community_lora(arch, "kohya"))
    last = arch.text.layers - 1                          # SD2 runs all but the last block
    extra = {f"lora_te_text_model_encoder_layers_{last}_mlp_fc1.lora_down.weight": np.zeros((2, 32), np.float32),
             f"lora_te_text_model_encoder_layers_{last}_mlp_fc1.lora_up.weight": np.zeros((128, 2), np.float32)}
    with caplog.at_level(logging.INFO):
        back = lora_fmt.from_state_dict({**sd, **extra}, arch)
    assert len(back) == len(community_lora(arch, "kohya")) and "never runs" in caplog.text
    bad = {**sd, "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": np.zeros((2, 4), np.float32),
           "lora_unet_nowhere.alpha": np.float32(1)}
    with pytest.raises(UserError, match="match no layer.*down_blocks_9"):
        lora_fmt.from_state_dict(bad, arch)
    with pytest.raises(UserError, match="SDXL"):
        lora_fmt.from_state_dict({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((2, 4))}, arch)
    key = next(k for k in sd if k.endswith("ff_net_2.lora_down.weight"))
    with pytest.raises(UserError, match="incomplete lora"):
        lora_fmt.from_state_dict({key: sd[key]}, arch)
    with pytest.raises(UserError, match="another architecture"):
        up = key.replace("lora_down", "lora_up")
        lora_fmt.from_state_dict({key: sd[key][:, :3], up: sd[up]}, arch)
    loha = {k.replace("lora_down.weight", "hada_w1_a"): v for k, v in sd.items() if k == key}
    with pytest.raises(UserError, match="incomplete loha"):
        lora_fmt.from_state_dict(loha, arch)
    with pytest.raises(UserError, match="not supported"):
        lora_fmt.from_state_dict({key.replace("lora_down.weight", "oft_blocks"): np.zeros(3, np.float32)}, arch)


def test_formats_that_cannot_hold_a_kind_say_so():
    arch = load_arch(TINY["v1"])
    loha, _, _ = lycoris_files(arch)
    from common.formats.mindspore_layout import lora_to_mindspore
    with pytest.raises(UserError, match="kohya format"):
        lora_fmt.to_diffusers(loha)
    with pytest.raises(UserError, match="attention layers only"):
        lora_to_mindspore(community_lora(arch, "kohya"), arch)
