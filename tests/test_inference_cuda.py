"""Sampling and LoRA loading on the PyTorch backend."""
import numpy as np
import pytest

from conftest import TINY
from common.formats import lora as lora_fmt
from common.formats import loading
from common.arch import load_arch
from common.formats.checkpoint_io import load_state_dict
from common.diffusion.generate import SampleSettings, sample_latents
from common.tokenizer import tokenizer_for


def pipeline(tiny_models, version="v1", **kw):
    from backends.cuda import Pipeline
    arch = load_arch(TINY[version])
    return arch, Pipeline(arch, load_state_dict(tiny_models[version]), **kw)


def latents(arch, pipe, seed, sampler="euler_ancestral", prompt="a photo of sks robot"):
    tok = tokenizer_for(arch.text)
    settings = SampleSettings(sampler=sampler, steps=4, scale=7.5, height=64, width=64, seed=seed, progress=False)
    return sample_latents(pipe, arch, tok([prompt] * 2), tok([""] * 2), settings, key=(0, 0))


def test_same_seed_same_image_different_seed_different(tiny_models):
    arch, pipe = pipeline(tiny_models, "v2")
    a, b, c = latents(arch, pipe, 1), latents(arch, pipe, 1), latents(arch, pipe, 2)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3
    assert not np.array_equal(a[0], a[1])  # the two images of a batch get different noise


def trained_lora(arch, seed=3):
    """A LoRA with non-zero up matrices and alpha != rank, so every scaling path matters."""
    lora = lora_fmt.init_lora(arch, rank=4, alpha=2.0, seed=seed, unet=True, text_encoder=True)
    rng = np.random.default_rng(seed)
    for pair in lora.values():
        pair.up = rng.standard_normal(pair.up.shape).astype(np.float32) * 0.05
    return lora


def test_lora_formats_round_trip(tiny_models):
    arch = load_arch(TINY["v1"])
    lora = trained_lora(arch)
    for fmt in (lora_fmt.to_kohya, lora_fmt.to_diffusers):
        back = lora_fmt.from_state_dict(fmt(lora), arch)
        assert set(back) == set(lora)
        for k in lora:
            np.testing.assert_allclose(back[k].delta(), lora[k].delta(), rtol=1e-6, atol=1e-7)
    kohya = lora_fmt.to_kohya(lora)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in kohya)
    assert float(kohya[next(k for k in kohya if k.endswith(".alpha"))]) == 2.0


def test_lora_scale_zero_is_the_base_model(tiny_models):
    arch = load_arch(TINY["v1"])
    lora = trained_lora(arch)
    from backends.cuda import Pipeline
    weights = load_state_dict(tiny_models["v1"])
    base = Pipeline(arch, weights)
    off = Pipeline(arch, lora_fmt.merge_loras(weights, arch, [(lora, 0.0)]))
    on = Pipeline(arch, lora_fmt.merge_loras(weights, arch, [(lora, 1.0)]))
    assert np.array_equal(latents(arch, base, 5, "ddim"), latents(arch, off, 5, "ddim"))
    assert not np.allclose(latents(arch, base, 5, "ddim"), latents(arch, on, 5, "ddim"))


def test_lora_for_another_architecture_is_refused(tiny_models):
    from common.errors import UserError
    lora = trained_lora(load_arch(TINY["v1"]))  # 3 text layers; tiny v2 runs 2 (SD2 skips its last)
    for fmt in (lora_fmt.to_kohya, lora_fmt.to_diffusers):
        back = lora_fmt.from_state_dict(fmt(lora), load_arch(TINY["v2"]))
        assert set(lora) - set(back) == {t for t in lora if ".layers.2." in t}      # skipped, noted
    bad = lora_fmt.to_kohya(trained_lora(load_arch(TINY["v1"])))
    key = next(k for k in bad if k.endswith("lora_down.weight"))
    bad[key] = bad[key][:, :-1]
    with pytest.raises(UserError, match="do not fit"):
        lora_fmt.from_state_dict(bad, load_arch(TINY["v1"]))


def test_mindone_lora_file_loads_directly(tmp_path):
    """text_to_image --lora_ckpt_path also takes MindONE's MindSpore LoRA .ckpt as it is."""
    from common.formats.checkpoint_io import save_mindspore_ckpt
    from common.formats.mindspore_layout import lora_to_mindspore
    arch = load_arch(TINY["v1"])
    lora = trained_lora(arch)
    path = str(tmp_path / lora_fmt.MINDSPORE_WEIGHT_NAME)
    save_mindspore_ckpt(path, lora_to_mindspore(lora, arch))
    for source in (path, str(tmp_path)):
        back = loading.load_lora_file(source, arch)
        assert set(back) == set(lora)
        for k in lora:
            np.testing.assert_allclose(back[k].delta(), lora[k].delta(), rtol=1e-5, atol=1e-6)
