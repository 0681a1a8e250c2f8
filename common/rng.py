"""Seeded random streams shared by both backends.

Every random draw that affects numbers (initial latents, training noise, timesteps, ancestral
noise, crops, flips, class-image picks) comes from here, in numpy, so the same seed gives the same
arrays on PyTorch and MindSpore. A stream is keyed by (seed, purpose, indices): drawing from one
never shifts another, which keeps resumed runs and multi-process shards reproducible.
"""
from __future__ import annotations

import zlib

import numpy as np


class Streams:
    def __init__(self, seed: int):
        self.seed = int(seed)

    def generator(self, purpose: str, *index: int) -> np.random.Generator:
        key = [self.seed & 0xFFFFFFFF, zlib.crc32(purpose.encode())] + [int(i) & 0xFFFFFFFF for i in index]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))

    def normal(self, purpose: str, shape, *index: int) -> np.ndarray:
        return self.generator(purpose, *index).standard_normal(shape, dtype=np.float32)

    def integers(self, purpose: str, high: int, size, *index: int) -> np.ndarray:
        return self.generator(purpose, *index).integers(0, high, size=size, dtype=np.int64)
