"""Prompt text -> the token-id chunks the text encoder reads, with long prompts (MindONE's
--support_long_prompts, A1111's scheme) or without (truncated, with a warning).

The text encoder reads `context_length` (77) ids: SOT, up to 75 prompt tokens, EOT and padding.
A long prompt's tokens are cut into chunks of 75, each framed the same way and encoded on its own;
the encodings are concatenated along the sequence axis (`encode_chunks`), which the UNet's
cross-attention reads at any length. A textual-inversion trigger word's ids are never split
between two chunks (A1111's rule): a chunk it would not fit in ends early.
"""
from __future__ import annotations

import logging
from typing import List, Tuple

import numpy as np

log = logging.getLogger("prompts")


def chunk_tokens(tokenizer, text: str) -> List[List[int]]:
    """The prompt's ids (no SOT/EOT) in chunks of at most context_length - 2; at least one chunk
    (an empty prompt is one empty chunk)."""
    size = tokenizer.context_length - 2
    chunks: List[List[int]] = []
    current: List[int] = []
    for piece in tokenizer.encode_pieces(text):
        if current and len(current) + len(piece) > size:
            chunks.append(current)
            current = []
        current.extend(piece)
    if current or not chunks:
        chunks.append(current)
    return chunks


def prompt_ids(tokenizer, text: str, long_prompts: bool = False, what: str = "prompt") -> np.ndarray:
    """int64 [chunks, context_length]: every chunk with `long_prompts`, else the first one only,
    with one warning saying how many tokens were dropped."""
    chunks = chunk_tokens(tokenizer, text)
    if len(chunks) > 1 and not long_prompts:
        dropped = sum(len(c) for c in chunks[1:])
        excerpt = text if len(text) <= 40 else text[:37] + "..."
        log.warning("%s %r is %d tokens long; the text encoder reads %d, so the last %d are dropped "
                    "(--support_long_prompts True keeps them)", what, excerpt, len(chunks[0]) + dropped,
                    len(chunks[0]), dropped)
        chunks = chunks[:1]
    return np.stack([tokenizer.frame(c) for c in chunks])


def same_chunk_count(tokenizer, a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pad the shorter of two [chunks, context_length] arrays with empty-prompt chunks, so a prompt
    and its negative prompt can be batched for classifier-free guidance (as MindONE and A1111 do)."""
    n = max(len(a), len(b))
    empty = tokenizer.frame([])[None]
    pad = lambda x: np.concatenate([x] + [empty] * (n - len(x))) if len(x) < n else x  # noqa: E731
    return pad(a), pad(b)


def encode_chunks(pipe, ids: np.ndarray, context_length: int):
    """A backend Pipeline's context for ids [B, chunks * context_length]: `encode_text` per chunk,
    joined along the sequence axis by the backend's `concat_context`."""
    if ids.ndim != 2 or ids.shape[1] % context_length:
        raise ValueError(f"token ids of shape {ids.shape} are not chunks of {context_length}")
    parts = [pipe.encode_text(ids[:, i:i + context_length]) for i in range(0, ids.shape[1], context_length)]
    return parts[0] if len(parts) == 1 else pipe.concat_context(parts)
