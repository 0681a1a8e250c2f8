"""MindONE's MindSpore layout: full-size names and shapes against MindONE's own lists (without
allocating), bit-exact round trips through real MindSpore files (MindSpore itself is the oracle
for the file format), and the MindSpore LoRA format."""
import os
import re
import tracemalloc

import numpy as np
import pytest

from common.formats import checkpoint_io as cio
from common.formats import keymap
from common.formats import mindspore_layout as ml
from common.arch import load_arch
from common.errors import UserError
from common.formats.lora import LoraPair, from_state_dict, init_lora, lora_targets, to_kohya

try:
    import mindspore
except ImportError:
    mindspore = None
needs_ms = pytest.mark.skipif(mindspore is None, reason="needs MindSpore (the format oracle)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.environ.get("MINDONE_NAME_LISTS", os.path.join(ROOT, "..", "shared", "reference", "mindone"))
needs_ref = pytest.mark.skipif(not os.path.isdir(REF), reason=f"MindONE name lists not at {REF}")
TINY = {"v1": "configs/tiny-v1-inference.yaml", "v2": "configs/tiny-v2-inference.yaml"}
FULL = {"v1": "configs/v1-inference.yaml", "v2": "configs/v2-inference.yaml"}


def random_sd(arch, dtype="fp32", seed=0):
    rng = np.random.default_rng(seed)
    return {k: cio.cast_array(rng.standard_normal(s, dtype=np.float32), dtype)
            for k, s in keymap.ldm_shapes(arch).items()}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:6]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (k, a[k].dtype, b[k].dtype)
        assert np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes(), k


def read_ref(filename):
    """MindONE list `name#(d0, d1)#Float32` -> {name: (shape, dtype)}."""
    out = {}
    with open(os.path.join(REF, filename)) as f:
        for line in f:
            name, shape, dtype = line.strip().split("#")
            out[name] = (tuple(int(d) for d in re.findall(r"\d+", shape)), dtype)
    return out


@pytest.fixture(scope="module", params=["v1", "v2"])
def tiny(request):
    arch = load_arch(TINY[request.param])
    return arch, random_sd(arch)


# ------------------------------------------------------------------ full size, no allocation

@needs_ref
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_names_and_shapes_equal_mindone_lists(version):
    arch = load_arch(FULL[version])
    ref = read_ref(f"ms_names_{version}.txt")
    ml._entries.cache_clear()
    tracemalloc.start()
    ours = ml.mindspore_shapes(arch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2 ** 20, f"{peak} bytes traced: the name walk must not allocate weights"
    optional = {e.ms for e in ml.mindspore_entries(arch) if e.optional}
    used = {k: s for k, s in ours.items() if k not in optional}
    assert used == {k: s for k, (s, _) in ref.items()}          # names AND shapes
    if version == "v2":
        # carried for a complete way back: the unused 24th OpenCLIP block and two OpenCLIP tensors
        p = ml.MS_TEXT_PREFIX
        assert optional == {k for k in ours if ".resblocks.23." in k} | {p + "text_projection", p + "logit_scale"}
        assert len(optional) == 14 and len(ref) == 1214
    else:
        assert optional == set() and len(ref) == 1082
    # MindONE's own files store exactly the two embedding tables in Float16; we keep source dtypes
    assert {k for k, (_, d) in ref.items() if d != "Float32"} == {
        ml.MS_TEXT_PREFIX + "embedding_table", ml.MS_TEXT_PREFIX + "positional_embedding"}


@needs_ref
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_vae_norms_are_written_as_gamma_beta(version):
    """MindONE builds its VAE norms with mindspore.nn.GroupNorm (gamma / beta); its non-strict
    loading would silently leave any other spelling at 1 / 0."""
    arch = load_arch(FULL[version])
    norms = {k for k in ml.mindspore_shapes(arch) if k.startswith("first_stage_model.")
             and re.search(r"norm[^.]*\.(gamma|beta)$", k)}
    assert len(norms) == 104 and norms <= set(read_ref(f"ms_names_{version}.txt"))
    assert not any(k.startswith("first_stage_model.") and re.search(r"norm[^.]*\.(weight|bias)$", k)
                   for k in ml.mindspore_shapes(arch))
    assert {ml.legacy_vae_norm_name(k) for k in norms} == {
        re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)) for k in norms}


def test_rules_on_full_size_examples():
    arch = load_arch(FULL["v1"])
    by_source = {s: e for e in ml.mindspore_entries(arch) for s in e.sources}
    u = keymap.UNET_PREFIX
    expect = {
        u + "input_blocks.0.0.weight": u + "input_blocks.0.0.conv.weight",
        u + "input_blocks.1.0.in_layers.0.weight": u + "input_blocks.1.0.in_layers_norm.gamma",
        u + "input_blocks.1.0.in_layers.2.bias": u + "input_blocks.1.0.in_layers_conv.conv.bias",
        u + "input_blocks.1.0.out_layers.0.bias": u + "input_blocks.1.0.out_layers_norm.beta",
        u + "input_blocks.1.0.out_layers.3.weight": u + "input_blocks.1.0.out_layers_conv.conv.weight",
        u + "input_blocks.4.0.skip_connection.weight": u + "input_blocks.4.0.skip_connection.conv.weight",
        u + "input_blocks.3.0.op.weight": u + "input_blocks.3.0.op.conv.weight",
        u + "output_blocks.2.1.conv.weight": u + "output_blocks.2.1.conv.conv.weight",
        u + "output_blocks.5.2.conv.bias": u + "output_blocks.5.2.conv.conv.bias",
        u + "out.0.weight": u + "out.0.gamma",
        u + "out.2.weight": u + "out.2.conv.weight",
        u + "input_blocks.1.1.proj_in.weight": u + "input_blocks.1.1.proj_in.weight",
        u + "input_blocks.1.1.transformer_blocks.0.norm2.bias": u + "input_blocks.1.1.transformer_blocks.0.norm2.beta",
        u + "time_embed.0.weight": u + "time_embed.0.weight",
        "first_stage_model.decoder.mid.attn_1.norm.weight": "first_stage_model.decoder.mid.attn_1.norm.gamma",
        "first_stage_model.encoder.down.0.block.0.norm2.bias": "first_stage_model.encoder.down.0.block.0.norm2.beta",
        "first_stage_model.encoder.mid.attn_1.q.weight": "first_stage_model.encoder.mid.attn_1.q.weight",
        keymap.CLIP_PREFIX + "embeddings.token_embedding.weight": ml.MS_TEXT_PREFIX + "embedding_table",
        keymap.CLIP_PREFIX + "final_layer_norm.bias": ml.MS_TEXT_PREFIX + "ln_final.beta",
        keymap.CLIP_PREFIX + "encoder.layers.3.mlp.fc2.weight":
            ml.MS_TEXT_PREFIX + "transformer_layer.resblocks.3.c_proj.weight",
    }
    assert {k: by_source[k].ms for k in expect} == expect
    fused = by_source[keymap.CLIP_PREFIX + "encoder.layers.0.self_attn.k_proj.weight"]
    assert fused.ms == ml.MS_TEXT_PREFIX + "transformer_layer.resblocks.0.attn.attn.in_proj.weight"
    assert fused.sources == tuple(keymap.CLIP_PREFIX + f"encoder.layers.0.self_attn.{p}_proj.weight"
                                  for p in "qkv") and fused.shape == (2304, 768)


# ------------------------------------------------------------------ weights

def test_sd1_fuses_q_k_v_rows_and_sd2_copies_in_proj():
    for version in ("v1", "v2"):
        arch = load_arch(TINY[version])
        sd = random_sd(arch)
        ms = ml.ldm_to_mindspore(sd, arch)
        name = ml.MS_TEXT_PREFIX + "transformer_layer.resblocks.1.attn.attn.in_proj.weight"
        if version == "v1":
            p = keymap.CLIP_PREFIX + "encoder.layers.1.self_attn."
            expected = np.vstack([sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]])
            emb = sd[keymap.CLIP_PREFIX + "embeddings.token_embedding.weight"]
        else:
            expected = sd[keymap.OPENCLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"]
            emb = sd[keymap.OPENCLIP_PREFIX + "token_embedding.weight"]
            assert ms[ml.MS_TEXT_PREFIX + "logit_scale"] is sd[keymap.OPENCLIP_PREFIX + "logit_scale"]
        assert np.array_equal(ms[name], expected)
        assert ms[ml.MS_TEXT_PREFIX + "embedding_table"] is emb           # a view, not a copy


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_in_memory_is_bit_exact(tiny, dtype):
    arch, sd = tiny
    sd = {k: cio.cast_array(v, dtype) for k, v in sd.items()}
    ms = ml.ldm_to_mindspore(sd, arch)
    assert set(ms) == set(ml.mindspore_shapes(arch))
    assert_same(ml.mindspore_to_ldm(ms, arch), sd)


@needs_ms
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_through_real_mindspore_files(tiny, dtype, tmp_path):
    arch, sd = tiny
    sd = {k: cio.cast_array(v, dtype) for k, v in sd.items()}
    ms = ml.ldm_to_mindspore(sd, arch)
    ours = tmp_path / "ours.ckpt"
    cio.save_mindspore_ckpt(str(ours), ms)
    loaded = mindspore.load_checkpoint(str(ours))                      # MindSpore reads our file
    code = {"fp32": mindspore.float32, "fp16": mindspore.float16, "bf16": mindspore.bfloat16}[dtype]
    assert sorted(loaded) == sorted(ms)
    for k, x in ms.items():
        assert loaded[k].dtype == code and tuple(loaded[k].shape) == x.shape, k
        assert loaded[k].asnumpy().tobytes() == np.ascontiguousarray(x).tobytes(), k
    assert_same(ml.mindspore_to_ldm(cio.load_state_dict(str(ours), keep_bf16=True), arch), sd)
    # ... and we read what MindSpore writes (with MindONE's append_dict extras)
    theirs = tmp_path / "theirs.ckpt"
    mindspore.save_checkpoint([{"name": k, "data": mindspore.Tensor(np.array(v))}
                               for k, v in ms.items() if dtype != "bf16"] or
                              [{"name": k, "data": loaded[k]} for k in ms],
                              str(theirs), append_dict={"epoch_num": 3, "note": "text"})
    back = cio.load_mindspore_ckpt(str(theirs))
    assert int(back.pop("epoch_num")) == 3 and "note" not in back
    assert_same(ml.mindspore_to_ldm(back, arch), sd)


@needs_ms
def test_sliced_tensors_and_crc_trailer(tmp_path, monkeypatch):
    x = np.arange(1000, dtype=np.float32).reshape(10, 100)
    monkeypatch.setattr(cio, "_MS_SLICE_BYTES", 256)          # MindSpore slices tensors > 512 MiB
    path = tmp_path / "sliced.ckpt"
    cio.save_mindspore_ckpt(str(path), {"w": x, "s": np.asarray(7, np.int64)})
    assert np.array_equal(mindspore.load_checkpoint(str(path))["w"].asnumpy(), x)
    got = cio.load_state_dict(str(path))
    assert np.array_equal(got["w"], x) and got["s"].shape == () and int(got["s"]) == 7
    crc = tmp_path / "crc.ckpt"
    mindspore.save_checkpoint([{"name": "w", "data": mindspore.Tensor(x)}], str(crc), crc_check=True)
    assert open(crc, "rb").read()[-17:-10] == b"crc_num"
    assert np.array_equal(cio.load_state_dict(str(crc))["w"], x)


def test_truncated_and_garbage_mindspore_files(tiny, tmp_path):
    arch, sd = tiny
    good = tmp_path / "good.ckpt"
    cio.save_mindspore_ckpt(str(good), ml.ldm_to_mindspore(sd, arch))
    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "junk.ckpt").write_bytes(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for name in ("cut.ckpt", "junk.ckpt", "empty.ckpt"):
        with pytest.raises(UserError, match=name):
            cio.load_state_dict(str(tmp_path / name))
    assert cio.checkpoint_format(str(good)) == "mindspore"


def test_vae_weight_bias_of_earlier_files_are_read(tiny):
    """Files written before the gamma / beta fix (VAE norms as weight / bias) still load."""
    arch, sd = tiny
    ms = ml.ldm_to_mindspore(sd, arch)
    earlier = {ml.legacy_vae_norm_name(k) or k: v for k, v in ms.items()}
    assert sum(k.startswith("first_stage") and k.endswith((".gamma", ".beta")) for k in ms) > 0
    assert not any(k.startswith("first_stage") and k.endswith((".gamma", ".beta")) for k in earlier)
    assert_same(ml.mindspore_to_ldm(earlier, arch), sd)
    name = next(k for k in ms if k.startswith("first_stage_model.") and k.endswith(".gamma"))
    twice = dict(ms, **{ml.legacy_vae_norm_name(name): ms[name]})
    with pytest.raises(UserError, match="twice"):
        ml.mindspore_to_ldm(twice, arch)


def test_errors_list_the_tensors(tiny):
    arch, sd = tiny
    ms = ml.ldm_to_mindspore(sd, arch)
    with pytest.raises(UserError, match="bogus"):
        ml.mindspore_to_ldm(dict(ms, bogus=np.zeros(1, np.float32)), arch)
    name = keymap.UNET_PREFIX + "out.2.conv.weight"
    with pytest.raises(UserError, match=re.escape(name)):
        ml.mindspore_to_ldm({k: v for k, v in ms.items() if k != name}, arch)
    with pytest.raises(UserError, match="wrong shape"):
        ml.mindspore_to_ldm(dict(ms, **{name: np.zeros((1, 1, 3, 3), np.float32)}), arch)
    with pytest.raises(UserError, match="LoRA"):
        ml.mindspore_to_ldm({"lora_rank": np.asarray(4)}, arch)
    other = load_arch(TINY["v2" if arch.version == "sd1" else "v1"])
    with pytest.raises(UserError):
        ml.mindspore_to_ldm(ms, other)
    # training bookkeeping next to the weights is skipped
    extra = dict(ms, epoch_num=np.asarray(1), loss_scale=np.asarray(1.0, np.float32))
    assert_same(ml.mindspore_to_ldm(extra, arch), sd)


def test_partial_checkpoints_and_parts(tiny):
    arch, sd = tiny
    unet = {k: v for k, v in sd.items() if k.startswith(keymap.UNET_PREFIX)}
    ms = ml.ldm_to_mindspore(unet, arch)
    assert all(k.startswith(keymap.UNET_PREFIX) for k in ms)
    assert_same(ml.mindspore_to_ldm(ms, arch), unet)
    full = ml.ldm_to_mindspore(sd, arch)
    only_vae = ml.mindspore_to_ldm(full, arch, parts=("vae",))
    assert only_vae and all(k.startswith(keymap.VAE_PREFIX) for k in only_vae)
    with pytest.raises(UserError, match="lacks the whole"):
        ml.ldm_to_mindspore(unet, arch, parts=("unet", "vae"))


def test_original_layout_quirks_and_ema(tiny):
    arch, sd = tiny
    base = ml.ldm_to_mindspore(sd, arch)
    variant = dict(sd, betas=np.zeros(1000, np.float32), alphas_cumprod=np.zeros(1000, np.float32))
    if arch.text.kind == "clip":   # no `text_model.` level, integer position_ids buffer
        variant = {k.replace("transformer.text_model.", "transformer."): v for k, v in variant.items()}
        variant["cond_stage_model.transformer.embeddings.position_ids"] = np.arange(77)[None]
    ema = {keymap.ema_name(k): v + 1 for k, v in sd.items() if k.startswith(keymap.UNET_PREFIX)}
    variant.update(ema, **{"model_ema.decay": np.asarray(0.999, np.float32)})
    assert_same(ml.ldm_to_mindspore(variant, arch), base)
    picked = ml.ldm_to_mindspore(variant, arch, ema=True)
    conv_in = keymap.UNET_PREFIX + "input_blocks.0.0.conv.weight"
    assert np.array_equal(picked[conv_in], base[conv_in] + 1)
    with pytest.raises(UserError, match="EMA"):
        ml.ldm_to_mindspore(sd, arch, ema=True)


def test_sd2_without_carried_tensors():
    arch = load_arch(TINY["v2"])
    optional = {e.ldm for e in keymap.iter_entries(arch) if e.optional}
    slim = {k: v for k, v in random_sd(arch).items() if k not in optional}
    ms = ml.ldm_to_mindspore(slim, arch)                  # e.g. a file exported from MindONE
    assert not any(".resblocks.2." in k or k.endswith("logit_scale") for k in ms)
    assert_same(ml.mindspore_to_ldm(ms, arch), slim)


# ------------------------------------------------------------------ LoRA

def test_lora_module_names_and_counts_at_full_size():
    v1, v2 = load_arch(FULL["v1"]), load_arch(FULL["v2"])
    mods = ml.lora_modules(v1)
    assert mods[keymap.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == (
        "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",)
    assert mods[keymap.UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"] == (
        "unet:up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",)
    assert mods[ml.MS_TEXT_PREFIX + "transformer_layer.resblocks.0.attn.attn.in_proj"] == tuple(
        f"text_encoder:encoder.layers.0.self_attn.{p}_proj" for p in "qkv")
    for arch, te in ((v1, 48), (v2, 92)):    # MindONE: 256 UNet LoRA tensors; TE 2 per module
        m = ml.lora_modules(arch)
        assert 2 * sum(k.startswith(keymap.UNET_PREFIX) for k in m) == 256
        assert 2 * sum(k.startswith(ml.MS_TEXT_PREFIX) for k in m) == te
        # every module path is a real module of the MindSpore model
        names = set(ml.mindspore_shapes(arch))
        assert all(k + ".weight" in names for k in m)


def mindone_lora(arch, rank=4, seed=0, dtype=np.float32, trained=True):
    """A LoRA as MindONE writes it: shared down per fused in_proj, one lora_rank."""
    rng = np.random.default_rng(seed)
    valid = lora_targets(arch, True, True)
    out = {}
    for module, targets in ml.lora_modules(arch).items():
        fan_in, fan_out = valid[targets[0]].fan_in, valid[targets[0]].fan_out
        out[module + ".lora_down.weight"] = (rng.standard_normal((rank, fan_in)) / rank).astype(dtype)
        up = rng.standard_normal((fan_out * len(targets), rank)) if trained else np.zeros((fan_out * len(targets), rank))
        out[module + ".lora_up.weight"] = up.astype(dtype)
    out["lora_rank"] = np.asarray(rank, np.int64)
    return out


def deltas(lora):
    return {t: p.delta() for t, p in lora.items()}


@pytest.mark.parametrize("trained", [True, False], ids=["trained", "untrained"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_mindspore_lora_to_kohya_and_back_is_bit_exact(tiny, trained, dtype):
    arch, _ = tiny
    ms = mindone_lora(arch, rank=6, dtype=dtype, trained=trained)
    lora = ml.lora_from_mindspore(ms, arch)
    assert set(lora) == set(lora_targets(arch, True, True))
    if trained:  # q/k/v share MindONE's down matrix; their ups are its row blocks (exact)
        m = ml.MS_TEXT_PREFIX + "transformer_layer.resblocks.0.attn.attn.in_proj"
        fused = ms[m + ".lora_up.weight"].astype(np.float32) @ ms[m + ".lora_down.weight"].astype(np.float32)
        w = arch.text.width
        for i, p in enumerate("qkv"):
            assert np.array_equal(lora[f"text_encoder:encoder.layers.0.self_attn.{p}_proj"].delta(),
                                  fused[i * w:(i + 1) * w])
    kohya = to_kohya(lora)
    again = ml.lora_to_mindspore(from_state_dict(kohya, arch), arch)
    assert_same(again, ms)


def kohya_lora(arch, ranks, seed=1, alpha=None):
    """Per-projection LoRA with its own downs (what kohya / PEFT train)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (t, layer) in enumerate(sorted(lora_targets(arch, True, True).items())):
        fan_in, fan_out = layer.fan_in, layer.fan_out
        r = ranks(t)
        if r == 0:
            continue
        out[t] = LoraPair(down=rng.standard_normal((r, fan_in)).astype(np.float32),
                          up=rng.standard_normal((fan_out, r)).astype(np.float32),
                          alpha=float(alpha or r))
    return out


def test_kohya_lora_to_mindspore_and_back_is_bit_exact(tiny):
    arch, _ = tiny
    lora = kohya_lora(arch, lambda t: 4)
    ms = ml.lora_to_mindspore(lora, arch)
    m = ml.MS_TEXT_PREFIX + "transformer_layer.resblocks.0.attn.attn.in_proj"
    assert int(ms["lora_rank"]) == 12 and ms["lora_rank"].dtype == np.int64
    assert ms[m + ".lora_down.weight"].shape == (12, arch.text.width)       # stacked q, k, v downs
    # stacked downs under a block-diagonal up: the fused update is the three updates stacked (the
    # extra products are exact zeros; a matmul may still round its longer sums differently)
    down, up = ms[m + ".lora_down.weight"], ms[m + ".lora_up.weight"]
    fused = up @ down
    w = arch.text.width
    for i, p in enumerate("qkv"):
        pair = lora[f"text_encoder:encoder.layers.0.self_attn.{p}_proj"]
        assert np.array_equal(down[4 * i:4 * i + 4], pair.down)
        assert np.array_equal(up[i * w:(i + 1) * w, 4 * i:4 * i + 4], pair.up)
        assert not np.delete(up[i * w:(i + 1) * w], np.s_[4 * i:4 * i + 4], axis=1).any()
        np.testing.assert_allclose(fused[i * w:(i + 1) * w], pair.delta(), rtol=1e-5, atol=1e-5)
    back = ml.lora_from_mindspore(ms, arch)                    # padding and blocks undone
    assert_same(to_kohya(back), to_kohya(lora))


def test_mixed_ranks_partial_qkv_and_alpha(tiny):
    arch, _ = tiny
    # ranks differ per layer; the text encoder has LoRA on q and v only (a common PEFT choice)
    ranks = lambda t: 0 if t.endswith("k_proj") else (2 if "attn1" in t else 3)
    lora = kohya_lora(arch, ranks)
    ms = ml.lora_to_mindspore(lora, arch)
    assert int(ms["lora_rank"]) == 6
    assert_same(to_kohya(ml.lora_from_mindspore(ms, arch)), to_kohya(lora))
    # alpha != rank has no place in MindONE's format: folded into down (x0.5 here: exact)
    halved = kohya_lora(arch, lambda t: 4, alpha=2)
    back = ml.lora_from_mindspore(ml.lora_to_mindspore(halved, arch), arch)
    assert set(back) == set(halved)
    for t, p in halved.items():
        assert back[t].alpha == back[t].rank == 4
        assert np.array_equal(back[t].delta(), p.delta()), t


def test_untrained_lora_keeps_a_zero_update(tiny):
    arch, _ = tiny
    lora = init_lora(arch, rank=3, alpha=3, seed=0, unet=True, text_encoder=True)
    back = ml.lora_from_mindspore(ml.lora_to_mindspore(lora, arch), arch)
    assert set(back) == set(lora)
    assert all(not back[t].delta().any() for t in back)


def test_mindspore_lora_errors(tiny):
    arch, _ = tiny
    ms = mindone_lora(arch)
    with pytest.raises(UserError, match="lora_rank 5"):
        ml.lora_from_mindspore(dict(ms, lora_rank=np.asarray(5)), arch)
    some_up = next(k for k in ms if k.endswith("lora_up.weight"))
    with pytest.raises(UserError, match="lacks its lora_up"):
        ml.lora_from_mindspore({k: v for k, v in ms.items() if k != some_up}, arch)
    with pytest.raises(UserError, match="does not match"):
        ml.lora_from_mindspore(dict(ms, **{"model.diffusion_model.nope.lora_down.weight": ms[some_up]}), arch)
    # tiny v1 runs 3 text blocks, tiny v2 only 2 (penultimate): block 2's LoRA has no place there
    with pytest.raises(UserError, match="resblocks.2"):
        ml.lora_from_mindspore(mindone_lora(load_arch(TINY["v1"])), load_arch(TINY["v2"]))
    assert ml.is_mindspore_lora(ms) and not ml.is_mindspore_lora(to_kohya(ml.lora_from_mindspore(ms, arch)))
