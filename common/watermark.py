"""The invisible watermark of `text_to_image.py --add_watermark`, as MindONE (and Stability's
reference scripts) mark their images: the 120 bits of b"StableDiffusion" in the DWT-DCT method of
the `invisible-watermark` package (`WatermarkEncoder().set_watermark("bytes", ...)`,
`encode(bgr, "dwtDct")`).

The method: the U channel (YUV) of the image, one level of a Haar DWT, and in every 4x4 block of
the approximation band (raster order, bit i mod 120) the largest-magnitude coefficient other than
the block's first is quantised to step 36 with an offset of 1/4 step for a 0 bit and 3/4 step for
a 1 bit (despite the method's name, the package's dwtDct does not transform the block). Decoding
averages each bit's votes over the image.

Written in numpy so that both backends and an install without OpenCV / PyWavelets / torch have
it; a mark made here is read by `invisible-watermark`'s own decoder from the saved PNG
(`WatermarkDecoder("bytes", 120).decode(cv2.imread(path), "dwtDct")`). Two deliberate
differences from MindONE's copy of that code: MindONE hands it RGB where it expects BGR (so its
mark sits in a different channel and the standard decoder cannot read it from the file), and only
the approximation band is changed here (the package also swaps the horizontal and vertical
detail bands when it rebuilds the image, which alters every 2x2 block of U).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

MESSAGE = b"StableDiffusion"
STEP = 36.0                  # quantisation step (the package's scale for U)
BLOCK = 4
MIN_PIXELS = 256 * 256       # the package refuses smaller images; MindONE then leaves them as they are

# BGR -> YUV of OpenCV's COLOR_BGR2YUV (written here for RGB): Y, then U = 0.492 (B - Y) + 128.
_Y = np.array([0.299, 0.587, 0.114])
_U = 0.492 * (np.array([0.0, 0.0, 1.0]) - _Y)
# RGB change that moves U by 1 and keeps Y and V: R fixed, B and G chosen so that Y is unchanged.
_DU = np.array([0.0, -_Y[2] / _Y[1], 1.0]) / 0.492


def _bits(message: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(message, np.uint8)).astype(np.float64)


def _blocks(rgb: np.ndarray):
    """(the 4x4 blocks of the U channel's Haar approximation [rb, cb, 4, 4], index of each
    block's largest coefficient after the first [rb, cb])."""
    h, w = rgb.shape[0] // 8 * 8, rgb.shape[1] // 8 * 8
    u = rgb[:h, :w].astype(np.float64) @ _U + 128.0
    ca = (u[0::2, 0::2] + u[0::2, 1::2] + u[1::2, 0::2] + u[1::2, 1::2]) / 2.0   # Haar approximation
    rb, cb = ca.shape[0] // BLOCK, ca.shape[1] // BLOCK
    blocks = ca[:rb * BLOCK, :cb * BLOCK].reshape(rb, BLOCK, cb, BLOCK).transpose(0, 2, 1, 3)
    pos = np.abs(blocks.reshape(rb, cb, -1)[..., 1:]).argmax(-1) + 1
    return blocks, pos


def embed(rgb: np.ndarray, message: bytes = MESSAGE) -> Optional[np.ndarray]:
    """The watermarked copy of a uint8 HxWx3 RGB image, or None when it is smaller than 256x256
    pixels (too small to carry the mark)."""
    if rgb.shape[0] * rgb.shape[1] < MIN_PIXELS:
        return None
    blocks, pos = _blocks(rgb)
    rb, cb = pos.shape
    bits = _bits(message)
    bit = bits[np.arange(rb * cb) % len(bits)].reshape(rb, cb)
    flat = blocks.reshape(rb, cb, -1).copy()
    val = np.take_along_axis(flat, pos[..., None], -1)[..., 0]
    new = np.where(val >= 0, 1.0, -1.0) * (np.abs(val) // STEP + 0.25 + 0.5 * bit) * STEP
    np.put_along_axis(flat, pos[..., None], new[..., None], -1)
    delta = (flat.reshape(blocks.shape) - blocks).transpose(0, 2, 1, 3).reshape(rb * BLOCK, cb * BLOCK)
    # inverse Haar of an approximation change: each pixel of its 2x2 block moves by half of it
    du = np.kron(delta / 2.0, np.ones((2, 2)))
    out = rgb.astype(np.float64)
    out[:du.shape[0], :du.shape[1]] += du[..., None] * _DU
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def extract(rgb: np.ndarray, length: int = len(MESSAGE)) -> bytes:
    """The `length`-byte message read from a uint8 RGB image (the decoder's majority vote)."""
    blocks, pos = _blocks(rgb)
    val = np.abs(np.take_along_axis(blocks.reshape(*pos.shape, -1), pos[..., None], -1)[..., 0]).ravel()
    votes = (val % STEP > 0.5 * STEP).astype(np.float64)
    n = length * 8
    score = np.bincount(np.arange(votes.size) % n, votes, minlength=n) / np.bincount(
        np.arange(votes.size) % n, minlength=n).clip(min=1)
    return np.packbits(score * 255 > 127).tobytes()
