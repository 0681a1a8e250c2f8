"""MindSpore models (backends.ascend) against the PyTorch backend on identical weights, fp32 on CPU.

Tiny SD1 (eps) and tiny SD2 (v) models, mid-size SD1 / SD2 models at 128 px (realistic widths and
head layouts: configs/mid-v*-inference.yaml), full-width blocks at SD's real widths and head layouts,
LoRA inject / fold / merge / remove, GRAPH_MODE against PYNATIVE_MODE, and the parameter names of
full-size SD1 / SD2 against MindONE's own name lists. Networks are compiled once per module.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import ROOT, TINY  # noqa: E402
from common.formats import lora as lora_fmt  # noqa: E402
from common.arch import load_arch  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.formats.init_weights import random_weights  # noqa: E402
from common.formats.mindspore_layout import legacy_vae_norm_name, mindspore_shapes  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference", "mindone")


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    from backends.ascend.device import setup
    setup(mode=0)  # the device is chosen once per process, whichever test file ran MindSpore first
    yield


def _weights(arch, seed=0):
    """random_weights with the 1-D tensors (norm scales, biases) perturbed, so that a swapped or
    misnamed norm / bias cannot go unnoticed."""
    sd = random_weights(arch, seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in sd.items():
        if v.ndim == 1:
            sd[k] = (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
    return sd


MID = {"mid-v1": os.path.join(ROOT, "configs", "mid-v1-inference.yaml"),
       "mid-v2": os.path.join(ROOT, "configs", "mid-v2-inference.yaml")}


class Pair:
    """One architecture on both backends with the same weights and inputs; MindSpore outputs are
    computed once (in GRAPH_MODE) and cached. Tiny models run on small inputs; the mid-size ones
    (SD1 / SD2 block layouts at realistic widths and 64-wide heads) at their native 128 px."""

    def __init__(self, version, parameterization):
        from backends.ascend.models import build_models, load_original
        from backends.cuda.models import load_models

        arch = load_arch({**TINY, **MID}[version])
        self.arch = dataclasses.replace(
            arch, schedule=dataclasses.replace(arch.schedule, parameterization=parameterization))
        self.sd = _weights(self.arch)
        self.unet_t, self.vae_t, self.text_t, _ = load_models(self.arch, self.sd)
        self.net = build_models(self.arch)
        load_original(self.net, self.sd, self.arch)
        rng = np.random.default_rng(1)
        self.ids = rng.integers(0, self.arch.text.vocab_size, (2, 77)).astype(np.int32)
        mid = version in MID
        latent, pixels = (self.arch.latent_size, self.arch.image_size) if mid else (16, 32)
        self.x = rng.standard_normal((2, 4, latent, latent)).astype(np.float32)
        self.t = np.array([3, 977], np.int32)
        self.ctx = rng.standard_normal((2, 77, self.arch.unet.context_dim)).astype(np.float32)
        self.img = rng.uniform(-1, 1, (1, 3, pixels, pixels)).astype(np.float32)
        self.z = rng.standard_normal((1, 4, pixels // 8, pixels // 8)).astype(np.float32)
        self._ms = None

    def ms_outputs(self):
        if self._ms is None:
            self._ms = run_ms(self.net, self)
        return self._ms

    @torch.no_grad()
    def torch_outputs(self, unet=None, text=None):
        unet, text = unet or self.unet_t, text or self.text_t
        post = self.vae_t.encode(torch.from_numpy(self.img)).latent_dist
        return {"text": text(torch.from_numpy(self.ids).long())[0].numpy(),
                "unet": unet(torch.from_numpy(self.x), torch.from_numpy(self.t).long(),
                             encoder_hidden_states=torch.from_numpy(self.ctx)).sample.numpy(),
                "mean": post.mean.numpy(), "logvar": post.logvar.numpy(),
                "decode": self.vae_t.decode(torch.from_numpy(self.z)).sample.numpy()}


def run_ms(net, p, parts=("text", "unet", "mean", "logvar", "decode")):
    T = ms.Tensor
    out = {}
    if "text" in parts:
        out["text"] = net.text_encoder(T(p.ids)).asnumpy()
    if "unet" in parts:
        out["unet"] = net.unet(T(p.x), T(p.t), T(p.ctx)).asnumpy()
    if "mean" in parts:
        mean, logvar = net.vae.encode(T(p.img))
        out["mean"], out["logvar"] = mean.asnumpy(), logvar.asnumpy()
    if "decode" in parts:
        out["decode"] = net.vae.decode(T(p.z)).asnumpy()
    return out


@pytest.fixture(scope="module")
def pairs():
    return {}


@pytest.fixture(scope="module", params=[("v1", "eps"), ("v2", "v"), ("mid-v1", "eps"), ("mid-v2", "v")],
                ids=["sd1-eps", "sd2-v", "mid-sd1-eps", "mid-sd2-v"])
def pair(request, pairs):
    if request.param not in pairs:
        pairs[request.param] = Pair(*request.param)
    return pairs[request.param]


@pytest.fixture(scope="module", params=[("v1", "eps"), ("v2", "v")], ids=["sd1-eps", "sd2-v"])
def tiny_pair(request, pairs):
    """PyNative is checked on the tiny models only (at mid size it would repeat them slowly)."""
    if request.param not in pairs:
        pairs[request.param] = Pair(*request.param)
    return pairs[request.param]


def _max_diff(a, b):
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ----------------------------------------------------------------------------- names

def _reference_names(filename):
    out = {}
    with open(os.path.join(REFERENCE, filename)) as f:
        for line in f:
            name, shape, _ = line.strip().split("#")
            out[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.mark.parametrize("config,names", [("v1-inference.yaml", "ms_names_v1.txt"),
                                          ("v2-inference.yaml", "ms_names_v2.txt")])
def test_full_size_parameter_names_equal_mindone(config, names):
    """Every parameter of full-size SD1 / SD2 has MindONE's name and shape, none more or less
    (so mindspore.load_param_into_net takes a MindONE .ckpt as is), VAE GroupNorms included
    (gamma / beta, as MindONE's nn.GroupNorm names them)."""
    from backends.ascend.models import build_models, parameter_shapes

    if not os.path.isdir(REFERENCE):
        pytest.skip("MindONE reference name lists not found beside the checkout")
    want = _reference_names(names)
    arch = load_arch(os.path.join(ROOT, "configs", config))
    got = parameter_shapes(build_models(arch))    # zero-initialised: instant at full size
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert len(got) == {"ms_names_v1.txt": 1082, "ms_names_v2.txt": 1214}[names]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_tiny_names_equal_the_layout_module(version):
    """The Cells and common.formats.mindspore_layout (which converts checkpoints) agree on every tensor
    the model runs."""
    from backends.ascend.models import build_models, optional_names, parameter_shapes

    arch = load_arch(TINY[version])
    layout = {k: v for k, v in mindspore_shapes(arch).items() if k not in optional_names(arch)}
    assert parameter_shapes(build_models(arch)) == layout


def test_load_rejects_wrong_checkpoints():
    from backends.ascend.models import build_models, load_mindspore, load_original

    arch = load_arch(TINY["v1"])
    net = build_models(arch)
    sd = random_weights(arch)
    with pytest.raises(UserError, match="does not define"):
        load_original(net, {**sd, "model.diffusion_model.extra.weight": np.zeros(3, np.float32)}, arch)
    wrong = dict(sd)
    wrong["model.diffusion_model.out.2.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    with pytest.raises(UserError, match="wrong shape"):
        load_original(net, wrong, arch)
    params = {p.name: np.ones(p.shape, np.float32) for p in net.get_parameters()}
    del params["model.diffusion_model.out.0.gamma"]
    with pytest.raises(UserError, match="lacks 1"):
        load_mindspore(net, params)
    # Files written before MindONE's VAE naming was followed: VAE GroupNorms as weight / bias.
    earlier = {legacy_vae_norm_name(k) or k: v for k, v in params.items()}
    earlier["model.diffusion_model.out.0.gamma"] = np.full((32,), 2, np.float32)
    earlier["first_stage_model.encoder.norm_out.weight"] = np.full((32,), 3, np.float32)
    assert earlier.keys() != params.keys()
    load_mindspore(net, earlier)
    assert np.all(net.vae.encoder.norm_out.gamma.asnumpy() == 3) and np.all(net.unet.out[0].gamma.asnumpy() == 2)


def test_mindone_ckpt_loads_with_load_param_into_net(tmp_path):
    """A MindONE-layout .ckpt (embedding tables in Float16, as MindONE saves them; SD2's unused
    24th-style block and text_projection carried along) loads with MindSpore's own loader: every
    parameter is filled, only the tensors SD does not run are left over, values as load_original."""
    from common.formats.mindspore_layout import ldm_to_mindspore

    from backends.ascend.models import build_models, load_original, optional_names

    arch = load_arch(TINY["v2"])
    sd = random_weights(arch, seed=5)
    items = []
    for k, v in ldm_to_mindspore(sd, arch).items():
        fp16 = k.endswith(("embedding_table", "positional_embedding"))
        items.append({"name": k, "data": ms.Tensor(v.astype(np.float16) if fp16 else v)})
    path = str(tmp_path / "mindone.ckpt")
    ms.save_checkpoint(items, path)
    net = build_models(arch)
    param_not_loaded, ckpt_not_loaded = ms.load_param_into_net(net, ms.load_checkpoint(path))
    assert param_not_loaded == []
    assert set(ckpt_not_loaded) == optional_names(arch) and ckpt_not_loaded
    ref = build_models(arch)
    load_original(ref, sd, arch)
    want = {p.name: p.asnumpy() for p in ref.get_parameters()}
    for p in net.get_parameters():
        tol = 1e-3 * np.abs(want[p.name]).max() if "embedding" in p.name else 0.0
        assert p.dtype == ms.float32 and _max_diff(p.asnumpy(), want[p.name]) <= tol, p.name


# ----------------------------------------------------------------------------- parity

def test_text_encoder_matches_pytorch(pair):
    diff = _max_diff(pair.ms_outputs()["text"], pair.torch_outputs()["text"])
    assert diff <= 1e-4, diff


def test_unet_matches_pytorch(pair):
    want = pair.torch_outputs()["unet"]
    diff = _max_diff(pair.ms_outputs()["unet"], want)
    assert want.std() > 0.1
    assert diff <= 1e-4 * want.std(), (diff, want.std())


def test_vae_matches_pytorch(pair):
    got, want = pair.ms_outputs(), pair.torch_outputs()
    for key in ("mean", "logvar", "decode"):
        assert want[key].std() > 1e-2, key
        diff = _max_diff(got[key], want[key])
        assert diff <= 1e-4, (key, diff)


def test_logvar_is_clamped_and_weights_reload_after_compiling():
    """LDM clamps the posterior log-variance to [-30, 20] (a huge quant_conv bias shows it); the
    bias is set after the encoder graph was compiled, so this also shows that compiled graphs read
    the current weights (pipelines load or merge weights into compiled nets)."""
    from backends.ascend.models import build_models, load_original

    arch = load_arch(TINY["v2"])
    sd = random_weights(arch)
    net = build_models(arch)
    load_original(net, sd, arch)
    x = ms.Tensor(np.zeros((1, 3, 16, 16), np.float32))
    assert np.abs(net.vae.encode(x)[1].asnumpy()).max() < 20
    bias = sd["first_stage_model.quant_conv.bias"].copy()
    bias[4:] = [100.0, -100.0, 0.0, 0.0]
    net.vae.quant_conv.bias.set_data(ms.Tensor(bias))
    logvar = net.vae.encode(x)[1].asnumpy()
    assert logvar[:, 0].max() == 20.0 and logvar[:, 1].min() == -30.0


def test_pynative_mode_agrees_with_graph_mode(tiny_pair):
    pair = tiny_pair
    graph = pair.ms_outputs()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        eager = run_ms(pair.net, pair)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    for key, value in graph.items():
        assert _max_diff(eager[key], value) <= 1e-6 * max(1.0, float(np.abs(value).max())), key


# ----------------------------------------------------------------------------- full-width blocks

def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))


def _copy_weights(cell, module, rename):
    own = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    for p in cell.get_parameters():
        p.set_data(ms.Tensor(own[rename(p.name)]))
    assert len(list(cell.get_parameters())) == len(own)


def _gamma_beta(name):
    """MindSpore LayerNorm / GroupNorm names -> PyTorch's (everything else is named alike)."""
    return name.replace("gamma", "weight").replace("beta", "bias")


@pytest.mark.parametrize("ch,heads,context,linear", [(320, 5, 1024, True), (640, 8, 768, False)],
                         ids=["sd2-level0", "sd1-level1"])
def test_full_width_spatial_transformer_matches_diffusers(ch, heads, context, linear):
    """One SpatialTransformer at SD's real width and head layout (SD2: 5 heads of 64, linear
    projections; SD1: 8 heads of 80, 1x1-conv projections) against diffusers' Transformer2DModel."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from backends.ascend.unet import SpatialTransformer

    ref = Transformer2DModel(num_attention_heads=heads, attention_head_dim=ch // heads,
                             in_channels=ch, cross_attention_dim=context, norm_num_groups=32,
                             use_linear_projection=linear).eval()
    _randomize(ref, 0)
    cell = SpatialTransformer(ch, heads, ch // heads, 1, context, 32, linear)
    _copy_weights(cell, ref, _gamma_beta)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, ch, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, context)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    got = cell(ms.Tensor(x), None, ms.Tensor(ctx)).asnumpy()
    diff = _max_diff(got, want)
    assert diff <= 1e-4 * want.std(), (diff, want.std())


def test_full_width_resblock_matches_diffusers():
    from diffusers.models.resnet import ResnetBlock2D

    from backends.ascend.unet import ResBlock

    ref = ResnetBlock2D(in_channels=320, out_channels=640, temb_channels=1280, groups=32, eps=1e-5).eval()
    _randomize(ref, 1)
    names = {"in_layers_norm.gamma": "norm1.weight", "in_layers_norm.beta": "norm1.bias",
             "in_layers_conv.conv": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers_norm.gamma": "norm2.weight", "out_layers_norm.beta": "norm2.bias",
             "out_layers_conv.conv": "conv2", "skip_connection.conv": "conv_shortcut"}

    def rename(name):
        for mine, theirs in names.items():
            if name.startswith(mine):
                return theirs + name[len(mine):]
        raise KeyError(name)

    cell = ResBlock(320, 640, 1280, 32)
    _copy_weights(cell, ref, rename)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 320, 8, 8)).astype(np.float32)
    emb = rng.standard_normal((1, 1280)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(emb)).numpy()
    got = cell(ms.Tensor(x), ms.Tensor(emb)).asnumpy()
    diff = _max_diff(got, want)
    assert diff <= 1e-4 * want.std(), (diff, want.std())


# ----------------------------------------------------------------------------- LoRA

def _lora(arch, seed=3):
    """Non-zero ups, alpha != rank, and text layer 0 without a k adapter (a partly empty in_proj)."""
    lora = lora_fmt.init_lora(arch, rank=4, alpha=2.0, seed=seed, unet=True, text_encoder=True)
    rng = np.random.default_rng(seed)
    for pair in lora.values():
        pair.up = rng.standard_normal(pair.up.shape).astype(np.float32) * 0.2
    del lora["text_encoder:encoder.layers.0.self_attn.k_proj"]
    return lora


@pytest.fixture(scope="module")
def sd1(pairs):
    if ("v1", "eps") not in pairs:
        pairs[("v1", "eps")] = Pair("v1", "eps")
    return pairs[("v1", "eps")]


def _torch_merged(p, lora, scale):
    from backends.cuda.models import load_models

    unet, _, text, _ = load_models(p.arch, lora_fmt.merge_loras(p.sd, p.arch, [(lora, scale)]))
    return p.torch_outputs(unet, text)


@pytest.fixture(scope="module")
def merged_torch(sd1):
    return _torch_merged(sd1, _lora(sd1.arch), 0.7)


def _fresh(p):
    from backends.ascend.models import build_models, load_original

    net = build_models(p.arch)
    load_original(net, p.sd, p.arch)
    return net


def test_injected_lora_matches_pytorch_then_folds(sd1, merged_torch):
    from backends.ascend import lora as L
    from backends.ascend.models import parameter_shapes

    net = _fresh(sd1)
    base_names = parameter_shapes(net)
    lora = _lora(sd1.arch)
    injected = L.inject_lora(sd1.arch, net.unet, net.text_encoder, lora, scale=0.7)
    names = parameter_shapes(net)
    # MindONE's LoRA layout: the base Dense moves to `.linear`, adapters beside it.
    q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    in_proj = "cond_stage_model.transformer.transformer_layer.resblocks.0.attn.attn.in_proj"
    assert {f"{q}.linear.weight", f"{q}.lora_down.weight", f"{q}.lora_up.weight"} <= set(names)
    assert names[f"{in_proj}.lora_down.weight"] == (12, 32) and names[f"{in_proj}.lora_up.weight"] == (96, 4)
    assert f"{q}.weight" not in names
    assert len(injected) == len(L.lora_parameters(net.unet, net.text_encoder)) // 2
    exported = L.export_lora(net.unet, net.text_encoder)
    assert set(exported) == set(lora)
    for k, pair in lora.items():
        assert np.array_equal(exported[k].down, pair.down) and np.array_equal(exported[k].up, pair.up)
        assert exported[k].alpha == pair.alpha

    got = run_ms(net, sd1, ("text", "unet"))
    assert _max_diff(got["text"], merged_torch["text"]) <= 1e-4
    assert _max_diff(got["unet"], merged_torch["unet"]) <= 1e-4 * merged_torch["unet"].std()
    assert _max_diff(got["unet"], sd1.ms_outputs()["unet"]) > 1e-3    # the LoRA does something

    # Folding restores the plain layout with W + delta, and the recompiled graph uses it (the
    # UNet's weights are checked directly; recompiling it again would only cost time).
    L.fold_lora(net.unet, net.text_encoder)
    assert parameter_shapes(net) == base_names
    assert _max_diff(net.text_encoder(ms.Tensor(sd1.ids)).asnumpy(), merged_torch["text"]) <= 1e-4
    target = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    folded = net.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.asnumpy()
    base = sd1.sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    assert _max_diff(folded, base + lora[target].delta(0.7)) <= 1e-6


def test_injected_locon_on_every_layer_matches_pytorch(sd1):
    """Trainable LoRA on every Linear and Conv2d (3x3 ResNet convs, 1x1 proj_in, down/upsamplers,
    text MLP): LoRAConv2d / LoRADense give the merged PyTorch model's outputs, fold exactly."""
    from backends.ascend import lora as L
    from test_lora_files import community_lora

    lora = {t: p for t, p in community_lora(sd1.arch, "all").items()}
    for pair in lora.values():
        pair.alpha = float(pair.rank)            # one fused in_proj needs equal q/k/v rank and alpha
    for t in [t for t in lora if ".self_attn." in t and not t.endswith("out_proj")]:
        lora[t].down, lora[t].up = lora[t].down[:2], lora[t].up[:, :2]
        lora[t].alpha = 2.0
    want = _torch_merged(sd1, lora, 0.6)
    net = _fresh(sd1)
    injected = L.inject_lora(sd1.arch, net.unet, net.text_encoder, lora, scale=0.6)
    assert any(isinstance(layer, L.LoRAConv2d) for layer in injected.values())
    exported = L.export_lora(net.unet, net.text_encoder)
    assert set(exported) == set(lora)
    for k, pair in lora.items():
        np.testing.assert_array_equal(exported[k].down.reshape(pair.down.shape), pair.down)
    got = run_ms(net, sd1, ("text", "unet"))
    assert _max_diff(got["text"], want["text"]) <= 1e-4
    assert _max_diff(got["unet"], want["unet"]) <= 1e-4 * want["unet"].std()


def test_merge_and_remove_lora(sd1, merged_torch):
    from backends.ascend import lora as L
    from backends.ascend.models import parameter_shapes

    text_lora = lora_fmt.select(_lora(sd1.arch), unet=False, text_encoder=True)
    net = _fresh(sd1)
    base = parameter_shapes(net)
    L.inject_lora(sd1.arch, None, net.text_encoder, text_lora, scale=0.7)
    with_lora = net.text_encoder(ms.Tensor(sd1.ids)).asnumpy()
    assert _max_diff(with_lora, merged_torch["text"]) <= 1e-4
    L.remove_lora(net.text_encoder)
    assert parameter_shapes(net) == base
    assert _max_diff(net.text_encoder(ms.Tensor(sd1.ids)).asnumpy(), sd1.ms_outputs()["text"]) == 0.0
    with pytest.raises(UserError, match="no unet"):
        L.inject_lora(sd1.arch, None, net.text_encoder, _lora(sd1.arch))
    with pytest.raises(UserError, match="not a layer of this model"):
        L.layer_of("text_encoder:encoder.layers.9.self_attn.q_proj", sd1.arch)


# ----------------------------------------------------------------------------- mixed precision

def test_float16_compute_keeps_float32_parameters(sd1):
    """MindONE-style mixed precision: fp16 Dense/Conv compute, fp32 norms and parameters."""
    from backends.ascend.models import build_models, load_original

    net = build_models(sd1.arch, dtype="fp16")
    load_original(net, sd1.sd, sd1.arch)
    assert {p.dtype for p in net.get_parameters()} == {ms.float32}
    got = net.text_encoder(ms.Tensor(sd1.ids)).asnumpy()
    want = sd1.ms_outputs()["text"]
    assert got.dtype == np.float32
    assert 0 < _max_diff(got, want) <= 2e-2 * np.abs(want).max()


def test_lora_dropout_acts_in_training_only():
    """--lora_dropout on the MindSpore backend: the LoRA branch's input is dropped while training
    (peft's lora_dropout), never at inference."""
    from backends.ascend import lora as L
    from backends.ascend.layers import Dense

    base = Dense(8, 6)
    layer = L.LoRADense(base, 2, 2.0, dropout=0.5)
    rng = np.random.default_rng(0)
    for p in (base.weight, layer.lora_down.weight, layer.lora_up.weight):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    x = ms.Tensor(rng.standard_normal((64, 8)).astype(np.float32))
    want = x.asnumpy() @ (base.weight.asnumpy() + layer.delta()).T + base.bias.asnumpy()
    layer.set_train(False)
    np.testing.assert_allclose(layer(x).asnumpy(), want, rtol=1e-5, atol=1e-5)
    layer.set_train(True)
    assert np.abs(layer(x).asnumpy() - want).max() > 1e-2
