"""Long prompts (--support_long_prompts): chunks of 75 tokens framed to 77, encoded one by one and
concatenated (checked against transformers' CLIPTextModel on chunks made from its own tokenizer),
the negative prompt padded to as many chunks, one warning when a prompt is truncated instead, and
the same image on both backends (whose UNets read any context length)."""
import logging

import numpy as np
import pytest

from conftest import TINY
from common.arch import load_arch
from common.diffusion.generate import SampleSettings, sample_latents, text_to_image
from common.formats.checkpoint_io import load_state_dict
from common.prompts import chunk_tokens, encode_chunks, prompt_ids, same_chunk_count
from common.tokenizer import default_vocab_path, tokenizer_for

SOT, EOT = 49406, 49407
LONG = "a portrait of a robot, " * 30 + "highly detailed, trending on artstation"   # 187 tokens
SIZE = 32
TEXT_PARITY = 1e-4                 # tests/test_ascend_models.py: text encoder, MindSpore vs PyTorch


def tok(version="v1"):
    return tokenizer_for(load_arch(TINY[version]).text)


@pytest.mark.parametrize("version,pad", [("v1", EOT), ("v2", 0)])
def test_a_long_prompt_becomes_chunks_of_75(version, pad):
    t = tok(version)
    ids = t.encode(LONG)
    assert len(ids) == 187
    rows = prompt_ids(t, LONG, long_prompts=True)
    assert rows.shape == (3, 77) and rows.dtype == np.int64
    for j, row in enumerate(rows):
        part = ids[75 * j:75 * (j + 1)]
        assert row[0] == SOT and row[1:1 + len(part)].tolist() == part and row[1 + len(part)] == EOT
        assert (row[2 + len(part):] == pad).all()
    assert rows[2, 1 + 37] == EOT                               # 187 = 75 + 75 + 37
    assert prompt_ids(t, LONG)[0].tolist() == rows[0].tolist() == t(LONG)[0].tolist()   # truncated: chunk 1


def test_chunk_boundaries():
    t = tok()
    assert chunk_tokens(t, "") == [[]]
    assert [len(c) for c in chunk_tokens(t, " ".join(["cat"] * 75))] == [75]    # exactly one full chunk
    assert [len(c) for c in chunk_tokens(t, " ".join(["cat"] * 76))] == [75, 1]
    assert [len(c) for c in chunk_tokens(t, " ".join(["cat"] * 150))] == [75, 75]
    empty = prompt_ids(t, "", long_prompts=True)
    assert empty.shape == (1, 77) and empty[0, :2].tolist() == [SOT, EOT] and (empty[0, 2:] == EOT).all()


def test_the_negative_prompt_gets_as_many_chunks():
    t = tok("v2")
    cond, uncond = same_chunk_count(t, prompt_ids(t, LONG, True), prompt_ids(t, "blurry", True))
    assert cond.shape == uncond.shape == (3, 77)
    assert uncond[0].tolist() == t("blurry")[0].tolist()
    assert (uncond[1:] == t("")[0]).all()                       # padded with empty prompts
    short, long = same_chunk_count(t, prompt_ids(t, "a cat", True), prompt_ids(t, LONG, True))
    assert short.shape == long.shape == (3, 77)


class FakePipe:
    """Records what the sampler feeds the networks; numpy all the way."""

    def __init__(self, width=32):
        self.width, self.encoded, self.contexts = width, [], []

    def encode_text(self, ids):
        self.encoded.append(ids.copy())
        return np.repeat(ids[..., None].astype(np.float32), self.width, -1)

    def concat_context(self, parts):
        return np.concatenate(parts, 1)

    def predict(self, x, t, context):
        self.contexts.append(context.shape)
        return np.zeros_like(x)

    def decode(self, latents):
        return np.zeros((len(latents), 3, 8, 8), np.float32)


def run(pipe, prompt, negative, long_prompts, scale=7.5, n_iter=2):
    arch = load_arch(TINY["v1"])
    settings = SampleSettings(sampler="ddim", steps=2, scale=scale, height=SIZE, width=SIZE, progress=False)
    return list(text_to_image(pipe, arch, tok(), [prompt], [negative], settings, n_samples=2, n_iter=n_iter,
                              long_prompts=long_prompts))


def test_long_prompt_context_is_the_chunks_concatenated():
    pipe = FakePipe()
    run(pipe, LONG, "blurry", long_prompts=True, n_iter=1)
    assert set(pipe.contexts) == {(4, 3 * 77, 32)}              # [uncond; cond] x 2 samples, 3 chunks
    assert len(pipe.encoded) == 3 and all(ids.shape == (4, 77) for ids in pipe.encoded)
    t = tok()
    want = prompt_ids(t, LONG, True)
    for j, ids in enumerate(pipe.encoded):                      # chunk j of every row, one call per chunk
        assert (ids[2:] == want[j]).all()
        assert (ids[:2] == (t("blurry")[0] if j == 0 else t("")[0])).all()
    pipe = FakePipe()
    run(pipe, LONG, "x " * 200, long_prompts=True, scale=1.0, n_iter=1)   # no guidance: no negative
    assert set(pipe.contexts) == {(2, 3 * 77, 32)}


def test_truncation_logs_one_warning_per_prompt(caplog):
    with caplog.at_level(logging.WARNING, logger="prompts"):
        run(FakePipe(), "a photo of sks robot", "blurry", long_prompts=False)
        assert not caplog.records
        run(FakePipe(), LONG, "blurry", long_prompts=False)     # 2 iterations, 2 samples: one line
        assert len(caplog.records) == 1
        message = caplog.records[0].getMessage()
        assert "187 tokens" in message and "last 112 are dropped" in message and "--support_long_prompts" in message
        caplog.clear()
        run(FakePipe(), "a cat", LONG, long_prompts=False)
        assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("negative prompt")
        caplog.clear()
        run(FakePipe(), LONG, LONG, long_prompts=True)
        assert not caplog.records


def test_chunks_encode_like_clip_text_model_on_each_chunk(tmp_path, tiny_models):
    """transformers' tokenizer and CLIPTextModel, chunk by chunk, as A1111 does; our context for
    the whole prompt on both backends."""
    import torch

    from backends.cuda import Pipeline
    from helpers.hf_clip import hf_clip_tokenizer
    vocab = default_vocab_path()
    if vocab is None:
        pytest.skip("open_clip's CLIP vocabulary is not installed")
    arch = load_arch(TINY["v1"])
    hf = hf_clip_tokenizer(vocab, tmp_path)
    body = hf(LONG, add_special_tokens=False, truncation=False)["input_ids"]
    chunks = [[SOT] + body[i:i + 75] + [EOT] for i in range(0, len(body), 75)]
    chunks = torch.tensor([c + [EOT] * (77 - len(c)) for c in chunks])
    pt = Pipeline(arch, load_state_dict(tiny_models["v1"]))
    with torch.no_grad():
        want = torch.cat([pt.text_encoder(chunk[None])[0] for chunk in chunks], 1).numpy()
    ids = prompt_ids(tokenizer_for(arch.text), LONG, long_prompts=True).reshape(1, -1)
    assert np.array_equal(ids.reshape(-1, 77), chunks.numpy())
    got = encode_chunks(pt, ids, 77).numpy()
    assert got.shape == (1, 3 * 77, arch.text.width) and np.abs(got - want).max() <= 1e-6
    pytest.importorskip("mindspore")
    from backends.ascend import Pipeline as MSPipeline
    ms = MSPipeline(arch, load_state_dict(tiny_models["v1"]))
    assert np.abs(encode_chunks(ms, ids, 77).asnumpy() - want).max() <= TEXT_PARITY


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_long_prompt_gives_the_same_image_on_both_backends(tiny_models, version):
    pytest.importorskip("mindspore")
    import backends.ascend as ascend
    import backends.cuda as cuda
    from common.images import to_uint8
    arch = load_arch(TINY[version])
    weights = load_state_dict(tiny_models[version])
    t = tokenizer_for(arch.text)
    cond, uncond = same_chunk_count(t, prompt_ids(t, LONG, True), prompt_ids(t, "blurry", True))
    cond, uncond = np.tile(cond.reshape(1, -1), (2, 1)), np.tile(uncond.reshape(1, -1), (2, 1))
    settings = SampleSettings(sampler="ddim", steps=3, scale=7.5, height=SIZE, width=SIZE, seed=0, progress=False)
    lat = {}
    for name, backend in (("pt", cuda), ("ms", ascend)):
        pipe = backend.Pipeline(arch, weights)
        lat[name] = sample_latents(pipe, arch, cond, uncond, settings, (0, 0))
        if name == "pt":
            truncated = sample_latents(pipe, arch, cond[:, :77], uncond[:, :77], settings, (0, 0))
            images = pipe.decode(lat["pt"])
        else:
            images_ms = pipe.decode(lat["ms"])
    assert np.abs(lat["pt"] - lat["ms"]).max() < 1e-3 * max(1.0, np.abs(lat["pt"]).max())
    pixels = np.abs(to_uint8(images).astype(np.float32) - to_uint8(images_ms).astype(np.float32)) / 255.0
    assert pixels.mean() <= 1 / 255
    assert np.abs(lat["pt"] - truncated).max() > 1e-3           # the prompt's tail reached the UNet


def test_mindspore_unet_reads_any_context_length(tiny_models):
    """The UNets' cross-attention takes contexts of 77, 154 and 231 tokens alike on both backends."""
    pytest.importorskip("mindspore")
    import torch
    from mindspore import Tensor

    import backends.ascend as ascend
    import backends.cuda as cuda
    arch = load_arch(TINY["v2"])
    weights = load_state_dict(tiny_models["v2"])
    from backends.ascend.device import setup
    # PyNative: one graph per context length would only cost compile time (graph mode runs the
    # long-prompt images in test_long_prompt_gives_the_same_image_on_both_backends)
    pt, ms = cuda.Pipeline(arch, weights), ascend.Pipeline(arch, weights, mode=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    outs = []
    try:
        for length in (77, 154, 231):
            ctx = rng.standard_normal((2, length, arch.unet.context_dim)).astype(np.float32)
            want = pt.predict(x, 500, torch.from_numpy(ctx))
            got = ms.predict(x, 500, Tensor(ctx))
            assert np.abs(got - want).max() <= 1e-4 * want.std()
            outs.append(want)
    finally:
        setup(0)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
