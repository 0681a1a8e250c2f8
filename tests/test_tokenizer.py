"""CLIP tokenizer: literal CLIP ids, agreement with transformers' CLIPTokenizer (SD1) and
open_clip's SimpleTokenizer (SD2), padding, truncation, batching and vocabulary errors."""
import gzip
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import common.tokenizer as tokmod
from common.arch import load_arch
from common.errors import UserError
from common.tokenizer import CLIPTokenizer, tokenizer_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = tokmod.default_vocab_path()
needs_vocab = pytest.mark.skipif(VOCAB is None, reason="open_clip's CLIP vocabulary is not installed")
SOT, EOT = 49406, 49407

# Prompts both SD tokenizers treat alike (no curly quotes / html entities: HF's fast tokenizer
# does not run ftfy or html.unescape, see OPENCLIP_ONLY_PROMPTS for those).
PROMPTS = [
    "a photo of sks dog",
    "A PHOTO OF SKS DOG",
    "  a   photo\tof\n sks   dog  ",
    "tabs\tand\r\nnewlines",
    "a photo of a cat, highly detailed; 8k, trending on artstation!!!",
    "1girl, 2 dogs, 3.14159, 1024x768, $100, 50% off, #hashtag @user",
    "café crème brûlée, naïve façade, Ærøskøbing, straße, ÉCOLE",
    "日本の猫, 고양이, кошка, γάτα, مرحبا",
    "emoji 🐶🐱 and 👍🏽 and ❤️ and 🇯🇵",
    "don't we'll they're I'm you've it's he'd",
    "(masterpiece:1.2), [worst quality], {best}, <lora:foo:0.8>",
    "snake_case-and-kebab/slash\\back ... --- ___",
    "",
    "   ",
    "a <|endoftext|> b",
    "a very " * 60 + "long prompt that goes well past seventy seven tokens",
]
OPENCLIP_ONLY_PROMPTS = [
    "Tom &amp; Jerry &lt;3",
    "it\u2019s a \u201cquoted\u201d word",
    "double &amp;amp; escaped",
    "<b>Tom &amp;amp; Jerry</b>",  # ftfy leaves entities alone next to '<'; html.unescape does not
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer (what SD1 pipelines use) from vocab.json/merges.txt made from
    the same gz file, exactly as OpenAI's CLIP lays out its 49408 ids."""
    if VOCAB is None:
        pytest.skip("open_clip's CLIP vocabulary is not installed")
    pytest.importorskip("transformers")
    from helpers.hf_clip import hf_clip_tokenizer
    hf = hf_clip_tokenizer(VOCAB, tmp_path_factory.mktemp("hf_clip_tokenizer"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (SOT, EOT, EOT)
    return hf


@pytest.fixture(scope="module")
def openclip_tokenizer():
    """open_clip's SimpleTokenizer (what SD2 uses), loaded from its file alone: importing the
    open_clip package would pull in torchvision."""
    if VOCAB is None:
        pytest.skip("open_clip's CLIP vocabulary is not installed")
    pytest.importorskip("torch")
    pytest.importorskip("ftfy")
    path = os.path.join(os.path.dirname(VOCAB), "tokenizer.py")
    spec = importlib.util.spec_from_file_location("_openclip_tokenizer_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path=VOCAB)


@needs_vocab
def test_literal_ids():
    tok = CLIPTokenizer()
    assert tok.sot_token == SOT and tok.eot_token == EOT and tok.vocab_size == 49408
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("a photo of sks dog") == [320, 1125, 539, 48136, 1929]
    assert tok.encode("A  Photo   OF a CAT") == [320, 1125, 539, 320, 2368]
    assert tok.encode("Hello, World! 123") == [3306, 267, 1002, 256, 272, 273, 274]
    assert tok.encode("café 🐶") == [15304, 10631]
    assert tok.encode("") == []
    row = tok("a photo of a cat")
    assert row.dtype == np.int64 and row.shape == (1, 77)
    assert row[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert (row[0, 7:] == EOT).all()


@needs_vocab
def test_sd1_vs_sd2_padding():
    sd1 = CLIPTokenizer(pad_token=49407)("a photo of a cat")[0]
    sd2 = CLIPTokenizer(pad_token=0)("a photo of a cat")[0]
    assert sd1[:7].tolist() == sd2[:7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert (sd1[7:] == 49407).all() and (sd2[7:] == 0).all()
    empty = CLIPTokenizer(pad_token=0)("")[0]
    assert empty[:2].tolist() == [SOT, EOT] and not empty[2:].any()


@needs_vocab
@pytest.mark.parametrize("pad", [49407, 0])
def test_truncation_keeps_eot_last(pad):
    tok = CLIPTokenizer(pad_token=pad)
    long_prompt = "a very " * 60 + "long prompt"
    ids = tok.encode(long_prompt)
    assert len(ids) == 122
    row = tok(long_prompt)[0]
    assert row.shape == (77,) and row[0] == SOT and row[76] == EOT
    assert row[1:76].tolist() == ids[:75]
    short = CLIPTokenizer(context_length=8, pad_token=pad)(long_prompt)
    assert short.shape == (1, 8) and short[0].tolist() == [SOT] + ids[:6] + [EOT]
    exact = tok(" ".join(["cat"] * 75))[0]  # 75 ids + SOT/EOT fill the context exactly
    assert exact[76] == EOT and (exact[1:76] == 2368).all()


@needs_vocab
def test_batch_input():
    tok = CLIPTokenizer(pad_token=0)
    prompts = ["a photo of a cat", "", "a photo of sks dog"]
    batch = tok(prompts)
    assert batch.shape == (3, 77) and batch.dtype == np.int64
    for row, prompt in zip(batch, prompts):
        np.testing.assert_array_equal(row, tok(prompt)[0])
    assert tok([]).shape == (0, 77)


@needs_vocab
def test_matches_transformers_clip_tokenizer(hf_tokenizer):
    tok = CLIPTokenizer()
    expected = hf_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    got = tok(PROMPTS)
    for prompt, want, have in zip(PROMPTS, expected, got.tolist()):
        assert have == want, prompt
    for prompt in PROMPTS:  # untruncated ids too
        assert tok.encode(prompt) == hf_tokenizer(prompt, add_special_tokens=False).input_ids, prompt


@needs_vocab
def test_matches_openclip_tokenizer(openclip_tokenizer):
    tok = CLIPTokenizer(pad_token=0)
    prompts = [p for p in PROMPTS if "<|" not in p] + OPENCLIP_ONLY_PROMPTS
    expected = openclip_tokenizer(prompts, context_length=77).numpy()
    got = tok(prompts)
    for prompt, want, have in zip(prompts, expected.tolist(), got.tolist()):
        assert have == want, prompt
    # ftfy uncurls quotes and html entities are unescaped, as in CLIP's own cleaning
    assert tok.encode("it\u2019s") == tok.encode("it's")
    assert tok.encode("double &amp;amp; escaped") == tok.encode("double & escaped")
    assert tok.encode("<i>&amp;amp;</i>") == tok.encode("<i>&</i>")


@needs_vocab
def test_tokenizer_for_arch():
    v1 = tokenizer_for(load_arch(os.path.join(REPO, "configs/tiny-v1-inference.yaml")).text)
    v2 = tokenizer_for(load_arch(os.path.join(REPO, "configs/tiny-v2-inference.yaml")).text)
    assert (v1.context_length, v1.pad_token) == (77, 49407)
    assert (v2.context_length, v2.pad_token) == (77, 0)
    assert v1("x")[0, -1] == 49407 and v2("x")[0, -1] == 0


@needs_vocab
def test_explicit_vocab_path_and_cache(tmp_path):
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(open(VOCAB, "rb").read())
    plain = tmp_path / "vocab.txt"  # an unzipped copy is accepted too
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    want = CLIPTokenizer()("a photo of sks dog")
    for path in (str(gz), str(tmp_path), str(plain)):  # file, folder holding it, unzipped
        np.testing.assert_array_equal(CLIPTokenizer(vocab_path=path)("a photo of sks dog"), want)
    # the parsed vocabulary is shared, so building tokenizers again is cheap
    assert CLIPTokenizer(vocab_path=str(gz))._vocab is CLIPTokenizer(vocab_path=str(tmp_path))._vocab
    assert CLIPTokenizer()._vocab is CLIPTokenizer(pad_token=0)._vocab


def test_missing_vocab_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "bpe_simple_vocab_16e6.txt.gz"
    with pytest.raises(UserError, match="CLIP vocabulary not found: .*nope"):
        CLIPTokenizer(vocab_path=str(missing))
    with pytest.raises(UserError, match="not found"):
        CLIPTokenizer(vocab_path=str(tmp_path))  # a folder without the file
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert tokmod.default_vocab_path() is None
    with pytest.raises(UserError, match="pip install instant-clip-tokenizer .*--tokenizer_path") as err:
        CLIPTokenizer()
    assert "\n" not in str(err.value)


@needs_vocab
@pytest.mark.parametrize("pad", [49407, 0])
def test_builtin_vocabulary_gives_the_same_ids(monkeypatch, pad):
    """Without a vocab file (an Ascend install: no open_clip), instant-clip-tokenizer's built-in
    vocabulary does the BPE; every prompt gets the ids the file gives."""
    prompts = PROMPTS + OPENCLIP_ONLY_PROMPTS + ["A <|startoftext|> and 1234567 and x" * 3]
    want = CLIPTokenizer(pad_token=pad)(prompts)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else find_spec(name, *a))
    assert tokmod.default_vocab_path() is None
    builtin = CLIPTokenizer(pad_token=pad)
    assert isinstance(builtin._vocab, tokmod._BuiltinVocab) and builtin.vocab_size == 49408
    np.testing.assert_array_equal(builtin(prompts), want)


def test_bad_vocab_file_errors(tmp_path):
    junk = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    junk.write_bytes(gzip.compress(b"header\nab cd\n"))
    with pytest.raises(UserError, match="not a CLIP BPE vocabulary"):
        CLIPTokenizer(vocab_path=str(junk))
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(UserError, match="cannot read CLIP vocabulary"):
        CLIPTokenizer(vocab_path=str(broken))


@needs_vocab
def test_import_and_load_stay_framework_free():
    """Locating the vocab must not import open_clip (torchvision) or any framework."""
    code = ("import sys, time; t = time.time(); from common.tokenizer import CLIPTokenizer; "
            "CLIPTokenizer(); print(time.time() - t); "
            "bad = [m for m in ('open_clip', 'torch', 'mindspore', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1.0
