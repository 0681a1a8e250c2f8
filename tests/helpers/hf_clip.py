"""transformers' CLIPTokenizer (what SD1 pipelines use) built offline from open_clip's copy of the
CLIP vocabulary, laid out as OpenAI's CLIP lays out its 49408 ids (an oracle independent of
common.tokenizer)."""
import gzip
import json


def _bytes_to_unicode():
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [256 + n for n in range(256 - len(printable))]  # the other bytes, in byte order
    return [chr(c) for c in printable + shifted]


def hf_clip_tokenizer(vocab_gz: str, folder):
    """A transformers CLIPTokenizer from `vocab_gz` (bpe_simple_vocab_16e6.txt.gz), its files
    written into `folder` (a pathlib.Path)."""
    import transformers

    merges = gzip.open(vocab_gz).read().decode("utf-8").split("\n")[1:48895]
    base = _bytes_to_unicode()
    vocab = base + [c + "</w>" for c in base] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
