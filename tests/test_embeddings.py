"""Textual inversion (--ti_ckpt_path): A1111/civitai .pt and .safetensors, diffusers'
learned_embeds and MindONE's .ckpt are read without torch; prompt embeddings equal diffusers'
own load_textual_inversion; both backends give the same image; bad files are one-line errors."""
import dataclasses
import os
import pickle

import numpy as np
import pytest

from conftest import TINY
from common.arch import load_arch
from common.diffusion.generate import SampleSettings, sample_latents
from common.errors import UserError
from common.formats.checkpoint_io import load_state_dict, save_state_dict
from common.formats.embeddings import add_embeddings, read_embedding, read_embeddings
from common.formats.keymap import token_embedding_name
from common.prompts import prompt_ids
from common.tokenizer import default_vocab_path, tokenizer_for

EOT = 49407
PROMPT = "a photo of sksemb robot next to a red cube, by otheremb"
NEGATIVE = "blurry, sksemb"


def vectors(n, width=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def a1111_pt(path, x, name="something else"):
    """What A1111's textual-inversion training writes (torch.save of a dict with a Parameter)."""
    import torch
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(x))},
                "name": name, "step": 500, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "v1-5"}, str(path))
    return str(path)


def diffusers_bin(path, token, x):
    import torch
    torch.save({token: torch.from_numpy(x)}, str(path))
    return str(path)


def mindone_ckpt(path, token, x):
    """MindONE's TextualInversionManager.save_checkpoint_textual_inversion: the new rows of the
    embedding table, with placeholder_token and num_vectors in append_dict."""
    ms = pytest.importorskip("mindspore")
    table = ms.Parameter(ms.Tensor(x), name="cond_stage_model.transformer.embedding_table")
    ms.save_checkpoint([{"name": table.name, "data": table}], str(path),
                       append_dict={"placeholder_token": token, "num_vectors": len(x)})
    return str(path)


@pytest.fixture
def files(tmp_path):
    """The same two embeddings in A1111's .pt and .safetensors forms (3 and 2 vectors)."""
    a, b = vectors(3, seed=1), vectors(2, seed=2)
    pt = a1111_pt(tmp_path / "sksemb.pt", a)
    st = str(tmp_path / "otheremb.safetensors")
    save_state_dict(st, {"emb_params": b})
    return {"sksemb": (pt, a), "otheremb": (st, b)}


def test_every_format_reads_with_its_trigger_word(tmp_path, files):
    for trigger, (path, x) in files.items():                   # A1111: the file's stem
        e = read_embedding(path)
        assert e.trigger == trigger and np.array_equal(e.vectors, x) and e.vectors.dtype == np.float32
    one = vectors(1)[0]
    e = read_embedding(diffusers_bin(tmp_path / "learned_embeds.bin", "<cat-toy>", one))
    assert e.trigger == "<cat-toy>" and e.vectors.shape == (1, 32) and np.array_equal(e.vectors[0], one)
    save_state_dict(str(tmp_path / "learned_embeds.safetensors"), {"<dog-toy>": vectors(2)})
    e = read_embedding(str(tmp_path / "learned_embeds.safetensors"))
    assert e.trigger == "<dog-toy>" and np.array_equal(e.vectors, vectors(2))
    e = read_embedding(mindone_ckpt(tmp_path / "sd_ti.ckpt", "<chinese-art>", vectors(3)))
    assert e.trigger == "<chinese-art>" and np.array_equal(e.vectors, vectors(3))
    import torch
    torch.save({"string_to_param": {"*": torch.from_numpy(vectors(2)).bfloat16()}}, str(tmp_path / "bf.pt"))
    e = read_embedding(str(tmp_path / "bf.pt"))
    assert e.vectors.dtype == np.float32
    assert np.array_equal(e.vectors, torch.from_numpy(vectors(2)).bfloat16().float().numpy())


def test_trigger_words_match_whole_words_in_any_case():
    t = tokenizer_for(load_arch(TINY["v1"]).text)
    plain = t.encode("a sksemb dog")
    t.add_trigger("SksEmb", [49408, 49409])
    assert t.encode("a SKSEMB dog") == t.encode("a sksemb dog") == [320, 49408, 49409, 1929]
    assert t.encode("(sksemb), x-sksemb") == t.encode("(") + [49408, 49409] + t.encode("), x-") + [49408, 49409]
    assert 49408 not in t.encode("sksembs sksemb2 xsksemb")
    assert tokenizer_for(load_arch(TINY["v1"]).text).encode("a sksemb dog") == plain   # per tokenizer


def test_add_embeddings_grows_the_table_the_vocabulary_and_the_tokenizer(tiny_models, files):
    arch = load_arch(TINY["v2"])
    weights = load_state_dict(tiny_models["v2"])
    name = token_embedding_name(arch)
    assert name == "cond_stage_model.model.token_embedding.weight"
    table = weights[name].copy()
    t = tokenizer_for(arch.text)
    grown = add_embeddings(read_embeddings([files["sksemb"][0], files["otheremb"][0]], arch), weights, arch, t)
    assert grown.text.vocab_size == 49408 + 5 and arch.text.vocab_size == 49408
    assert np.array_equal(weights[name][:49408], table)
    assert np.array_equal(weights[name][49408:], np.concatenate([files["sksemb"][1], files["otheremb"][1]]))
    ids = prompt_ids(t, PROMPT)[0]
    assert ids[4:7].tolist() == [49408, 49409, 49410]
    assert [i for i in ids if i > EOT] == [49408, 49409, 49410, 49411, 49412]
    assert (ids[ids.tolist().index(EOT) + 1:] == 0).all()        # SD2 pads with 0 after EOT


def test_embedding_is_not_split_between_long_prompt_chunks(files):
    from common.prompts import chunk_tokens
    arch = load_arch(TINY["v1"])
    t = tokenizer_for(arch.text)
    add_embeddings(read_embeddings([files["sksemb"][0]], arch),
                   {token_embedding_name(arch): np.zeros((49408, 32), np.float32)}, arch, t)
    chunks = chunk_tokens(t, "cat " * 74 + "sksemb dog")     # 74 + 3 vectors do not fit in 75
    assert [len(c) for c in chunks] == [74, 4] and chunks[1][:3] == [49408, 49409, 49410]


def test_prompt_embeddings_equal_diffusers_load_textual_inversion(tmp_path, tiny_models, files):
    """diffusers reads A1111's string_to_param .pt and the emb_params .safetensors itself (tokens
    passed, as A1111's trigger is the file name); prompt and negative prompt use the triggers."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from backends.cuda import Pipeline
    from backends.cuda.models import load_models
    from helpers.hf_clip import hf_clip_tokenizer
    vocab = default_vocab_path()
    if vocab is None:
        pytest.skip("open_clip's CLIP vocabulary is not installed")
    arch = load_arch(TINY["v1"])
    weights = load_state_dict(tiny_models["v1"])
    unet, vae, text, _ = load_models(arch, weights)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=hf_clip_tokenizer(vocab, tmp_path),
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    paths = [files["sksemb"][0], files["otheremb"][0]]
    pipe.load_textual_inversion(paths, token=["sksemb", "otheremb"])
    with torch.no_grad():
        theirs, theirs_neg = (x.numpy() for x in pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE))
    t = tokenizer_for(arch.text)
    weights = dict(weights)
    grown = add_embeddings(read_embeddings(paths, arch), weights, arch, t)
    ours = Pipeline(grown, weights)
    for prompt, want in ((PROMPT, theirs), (NEGATIVE, theirs_neg)):
        got = ours.encode_text(prompt_ids(t, prompt)).numpy()
        assert np.abs(got - want).max() <= 1e-5, prompt
    assert np.abs(theirs - Pipeline(arch, load_state_dict(tiny_models["v1"])).encode_text(
        tokenizer_for(arch.text)(PROMPT)).numpy()).max() > 1e-3      # the embedding mattered


def test_same_image_on_both_backends_with_an_embedding(tmp_path, tiny_models, files):
    pytest.importorskip("mindspore")
    import backends.ascend as ascend
    import backends.cuda as cuda
    arch = load_arch(TINY["v2"])
    weights = load_state_dict(tiny_models["v2"])
    t = tokenizer_for(arch.text)
    grown = add_embeddings(read_embeddings([mindone_ckpt(tmp_path / "ti.ckpt", "sksemb", vectors(3, seed=5))], arch),
                           weights, arch, t)
    cond = np.repeat(prompt_ids(t, PROMPT), 2, 0)
    uncond = np.repeat(prompt_ids(t, NEGATIVE), 2, 0)
    settings = SampleSettings(sampler="ddim", steps=3, scale=7.5, height=32, width=32, seed=0, progress=False)
    pt = sample_latents(cuda.Pipeline(grown, weights), grown, cond, uncond, settings, (0, 0))
    ms = sample_latents(ascend.Pipeline(grown, weights), grown, cond, uncond, settings, (0, 0))
    assert np.abs(pt - ms).max() < 1e-3 * max(1.0, np.abs(pt).max())


def one_line_error(match, fn, *args):
    with pytest.raises(UserError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_embedding_files_are_one_line_errors(tmp_path, files):
    import torch
    arch = load_arch(TINY["v1"])
    sd1 = a1111_pt(tmp_path / "sd1emb.pt", vectors(2, 768))
    sd2_arch = dataclasses.replace(arch, text=dataclasses.replace(arch.text, width=1024))
    message = one_line_error("sd1emb.pt", read_embeddings, [sd1], sd2_arch)
    assert "768 wide (SD 1.x)" in message and "1024 wide (SD 2.x)" in message
    one_line_error("768 wide .*32 wide", read_embeddings, [sd1], arch)
    one_line_error("not found: .*nothere.pt", read_embeddings, [str(tmp_path / "nothere.pt")], arch)
    (tmp_path / "garbage.pt").write_bytes(os.urandom(200))
    one_line_error("garbage.pt: not a readable", read_embedding, str(tmp_path / "garbage.pt"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    one_line_error("empty.safetensors", read_embedding, str(tmp_path / "empty.safetensors"))
    raw = open(files["sksemb"][0], "rb").read()
    (tmp_path / "cut.pt").write_bytes(raw[:len(raw) // 2])
    one_line_error("cut.pt: not a readable PyTorch", read_embedding, str(tmp_path / "cut.pt"))

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Evil()}}, f, protocol=2)
    one_line_error("evil.pt: refused: the pickle tries to run code", read_embedding, str(tmp_path / "evil.pt"))
    torch.save({"clip_g": torch.zeros(2, 1280), "clip_l": torch.zeros(2, 768)}, str(tmp_path / "xl.pt"))
    one_line_error("SDXL", read_embedding, str(tmp_path / "xl.pt"))
    torch.save({"string_to_param": {"*": torch.zeros(1, 32), "+": torch.zeros(1, 32)}}, str(tmp_path / "two.pt"))
    one_line_error("exactly one", read_embedding, str(tmp_path / "two.pt"))
    torch.save({"a": torch.zeros(32), "b": torch.zeros(32)}, str(tmp_path / "many.bin"))
    one_line_error("not a textual-inversion embedding", read_embedding, str(tmp_path / "many.bin"))
    save_state_dict(str(tmp_path / "huge.safetensors"), {"emb_params": np.zeros((76, 32), np.float32)})
    one_line_error("76 vectors", read_embedding, str(tmp_path / "huge.safetensors"))
    os.makedirs(tmp_path / "other")
    a1111_pt(tmp_path / "other" / "SKSEMB.pt", vectors(1))
    one_line_error("trigger word 'SKSEMB' is also", read_embeddings,
                   [files["sksemb"][0], str(tmp_path / "other" / "SKSEMB.pt")], arch)
