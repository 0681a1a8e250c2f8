"""CLIP byte-level BPE tokenizer, framework-neutral and offline.

Both SD 1.x (HF CLIPTokenizer) and SD 2.x (OpenCLIP) use the same OpenAI CLIP vocabulary,
`bpe_simple_vocab_16e6.txt.gz`; they differ only in the pad id. The vocabulary comes from, in order:
a path the user gives (`--tokenizer_path`, e.g. MindONE's copy), the installed `open_clip` package
(located without importing it: `import open_clip` pulls in torch), a MindONE checkout's copy in the
working directory, or else the `instant-clip-tokenizer` package (numpy only, the vocabulary built
in; the Ascend install's source), which then does the BPE of each pre-tokenized word. Text
cleaning, pre-tokenization, truncation and padding are ours in every case, and both sources give
the same ids (tested).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import regex

from common.errors import UserError

try:  # SD users' tokenizers (OpenAI CLIP, open_clip) run ftfy; fall back to plain NFC like HF's fast one
    import ftfy
except ImportError:  # pragma: no cover - ftfy is installed in our environments
    ftfy = None

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# where MindONE's Stable Diffusion example keeps its copy, relative to its folder
MINDONE_VOCAB = os.path.join("ldm", "models", "clip", VOCAB_FILENAME)
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
# Line 0 of the vocab file is a header; the next 49152 - 256 - 2 lines are the merges CLIP uses
# (256 byte tokens + 256 "</w>" tokens + merges + 2 specials = 49408 ids).
NUM_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer: the special tokens, English contractions, letter runs, single digits,
# and runs of anything else that is not whitespace.
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP map of every byte to a printable unicode character, so BPE never sees control
    characters or whitespace: printable Latin-1 bytes map to themselves, the rest to 256 + n.
    The dict's order (printable bytes first) is the order of the first 256 vocabulary ids."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def default_vocab_path() -> Optional[str]:
    """Path of the vocab file in the installed open_clip package or a MindONE checkout in the
    working directory, or None."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec else []
    for candidate in [os.path.join(f, VOCAB_FILENAME) for f in folders] + [MINDONE_VOCAB]:
        if os.path.isfile(candidate):
            return candidate
    return None


def resolve_vocab_path(vocab_path: Optional[str] = None) -> Optional[str]:
    """An explicit path (the .gz file, or a folder holding it), else a copy found on this machine,
    else None when instant-clip-tokenizer can stand in."""
    if vocab_path is None:
        found = default_vocab_path()
        if found is None and importlib.util.find_spec("instant_clip_tokenizer") is None:
            raise UserError(f"CLIP vocabulary {VOCAB_FILENAME} not found: pip install "
                            f"instant-clip-tokenizer (or open_clip_torch), or pass --tokenizer_path "
                            f"/path/to/{VOCAB_FILENAME}")
        return found
    path = os.path.expanduser(vocab_path)
    if os.path.isdir(path):
        path = os.path.join(path, VOCAB_FILENAME)
    if not os.path.isfile(path):
        raise UserError(f"CLIP vocabulary not found: {path} (pass the path of {VOCAB_FILENAME}, "
                        f"or omit the path to use open_clip's or instant-clip-tokenizer's)")
    return path


class _Vocab:
    """Parsed vocabulary: token -> id, merge ranks, and a per-word BPE cache shared by every
    tokenizer built from the same file."""

    def __init__(self, path: str):
        try:
            with open(path, "rb") as f:
                raw = f.read()
            if raw[:2] == b"\x1f\x8b":  # gzip magic; also accept an unzipped copy
                raw = gzip.decompress(raw)
            lines = raw.decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read CLIP vocabulary {path}: {e}") from None
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise UserError(f"not a CLIP BPE vocabulary (expected {NUM_MERGES} merge lines "
                            f"of two symbols after the header): {path}")
        self.byte_encoder = bytes_to_unicode()
        base = list(self.byte_encoder.values())
        tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + [SOT_TEXT, EOT_TEXT]
        self.encoder: Dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self.ranks: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot = self.encoder[SOT_TEXT]
        self.eot = self.encoder[EOT_TEXT]
        self.size = len(self.encoder)
        # Bounded so a long-running process fed arbitrary prompts cannot grow without limit.
        self.bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    def _bpe(self, word: str) -> Tuple[int, ...]:
        """Ids of one pre-tokenized word: byte-encode, then apply merges lowest rank first."""
        symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        ranks = self.ranks
        while len(symbols) > 1:
            pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, NUM_MERGES))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `best`, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.encoder[s] for s in symbols)


class _BuiltinVocab:
    """The vocabulary built into instant-clip-tokenizer, behind `_Vocab`'s interface."""

    def __init__(self):
        import instant_clip_tokenizer

        self._tokenizer = instant_clip_tokenizer.Tokenizer()
        self.sot, self.eot = self._tokenizer.start_of_text(), self._tokenizer.end_of_text()
        self.encoder = {SOT_TEXT: self.sot, EOT_TEXT: self.eot}
        self.size = self.eot + 1
        self.bpe = functools.lru_cache(maxsize=1 << 16)(lambda word: tuple(self._tokenizer.encode(word)))


_VOCABS: Dict[str, object] = {}


def _load_vocab(path: Optional[str]):
    key = os.path.realpath(path) if path else "<instant-clip-tokenizer>"
    if key not in _VOCABS:
        _VOCABS[key] = _Vocab(path) if path else _BuiltinVocab()
    return _VOCABS[key]


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy, html-unescape twice, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """CLIP tokenizer producing fixed-length int64 id arrays, as SD's text encoders expect.

    `pad_token` is 49407 (<|endoftext|>) for SD 1.x's HF tokenizer and 0 for SD 2.x's OpenCLIP.
    Trigger words (`add_trigger`, textual inversion) encode to the ids given for them.
    """

    def __init__(self, context_length: int = 77, pad_token: int = 49407,
                 vocab_path: Optional[str] = None):
        if context_length < 2:
            raise UserError(f"tokenizer context_length must be at least 2, got {context_length}")
        self._vocab = _load_vocab(resolve_vocab_path(vocab_path))
        self.context_length = context_length
        self.pad_token = pad_token
        self.sot_token = self._vocab.sot
        self.eot_token = self._vocab.eot
        self.vocab_size = self._vocab.size
        self._triggers: Dict[str, Tuple[int, ...]] = {}
        self._trigger_re = None

    def add_trigger(self, word: str, ids: Sequence[int]) -> None:
        """Make `word` encode to `ids` (a textual-inversion embedding's rows) wherever it stands
        as a whole word. Matching happens on the cleaned text, so it ignores case and repeated
        whitespace, as A1111's matching of the word's CLIP tokens does."""
        key = clean_text(word)
        if not key or not ids:
            raise UserError(f"trigger word {word!r}: needs a non-empty word and at least one id")
        self._triggers[key] = tuple(int(i) for i in ids)
        words = "|".join(regex.escape(k) for k in sorted(self._triggers, key=len, reverse=True))
        self._trigger_re = regex.compile(rf"(?<![\p{{L}}\p{{N}}])({words})(?![\p{{L}}\p{{N}}])")

    def _bpe_ids(self, cleaned: str) -> List[int]:
        ids: List[int] = []
        for word in _WORD_RE.findall(cleaned):
            special = self._vocab.encoder.get(word) if word in (SOT_TEXT, EOT_TEXT) else None
            ids.extend((special,) if special is not None else self._vocab.bpe(word))
        return ids

    def encode_pieces(self, text: str) -> List[Tuple[int, ...]]:
        """The ids of `encode(text)` grouped: one 1-tuple per BPE token, one tuple per trigger
        word (its embedding's ids, which long-prompt chunking keeps together)."""
        cleaned = clean_text(text)
        if self._trigger_re is None:
            return [(i,) for i in self._bpe_ids(cleaned)]
        pieces: List[Tuple[int, ...]] = []
        for n, part in enumerate(self._trigger_re.split(cleaned)):  # odd parts: trigger words
            pieces.extend([self._triggers[part]] if n % 2 else [(i,) for i in self._bpe_ids(part)])
        return pieces

    def encode(self, text: str) -> List[int]:
        """BPE ids of `text` (trigger words as their ids) without SOT/EOT and without truncation."""
        return [i for piece in self.encode_pieces(text) for i in piece]

    def frame(self, ids: Sequence[int]) -> np.ndarray:
        """int64 [context_length]: SOT + ids + EOT + padding (ids must fit: context_length - 2)."""
        if len(ids) > self.context_length - 2:
            raise ValueError(f"{len(ids)} ids do not fit between SOT and EOT in {self.context_length}")
        out = np.full(self.context_length, self.pad_token, dtype=np.int64)
        out[:len(ids) + 2] = [self.sot_token, *ids, self.eot_token]
        return out

    def __call__(self, texts: Union[str, List[str]]) -> np.ndarray:
        """int64 [N, context_length]: SOT + ids + EOT, truncated keeping EOT last, then padded."""
        if isinstance(texts, str):
            texts = [texts]
        return np.stack([self.frame(self.encode(text)[: self.context_length - 2]) for text in texts]) \
            if texts else np.zeros((0, self.context_length), np.int64)


EOT_ID = 49407       # <|endoftext|> in the CLIP vocabulary of every SD text encoder


def attention_mask(ids: np.ndarray) -> np.ndarray:
    """float32 [N, L]: 1 up to and including each row's first <|endoftext|>, 0 on the padding
    after it; transformers' CLIP tokenizer's attention_mask (diffusers' --text_encoder_use_attention_mask)."""
    ids = np.asarray(ids)
    first_eot = np.argmax(ids == EOT_ID, axis=1)
    return (np.arange(ids.shape[1])[None, :] <= first_eot[:, None]).astype(np.float32)


def tokenizer_for(text_arch, vocab_path: Optional[str] = None, max_length: Optional[int] = None) -> CLIPTokenizer:
    """Tokenizer matching a `common.arch.TextArch` (its context length and SD1/SD2 pad id);
    `max_length` frames prompts shorter (diffusers' --tokenizer_max_length), at most the context."""
    if max_length is not None and not 2 <= max_length <= text_arch.context_length:
        raise UserError(f"--tokenizer_max_length must be between 2 and the text encoder's context length "
                        f"{text_arch.context_length}, got {max_length}")
    return CLIPTokenizer(context_length=max_length or text_arch.context_length, pad_token=text_arch.pad_token,
                         vocab_path=vocab_path)
