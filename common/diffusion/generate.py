"""Text-to-image generation on any backend: prompts -> token ids -> seeded latents -> sampler ->
decoded images. The backend only evaluates the networks; the sampler arithmetic, guidance and
every random draw are here, so both backends produce the same image for the same seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from common.arch import ModelArch
from common.images import to_uint8
from common.prompts import encode_chunks, prompt_ids, same_chunk_count
from common.rng import Streams
from common.diffusion.samplers import denoise, guided, make_sampler
from common.diffusion.schedule import NoiseSchedule


@dataclass
class SampleSettings:
    sampler: str = "dpm_solver_pp"
    steps: int = 20
    scale: float = 7.5
    eta: float = 0.0
    height: int = 512
    width: int = 512
    seed: int = 42
    progress: bool = True


def latent_shape(arch: ModelArch, n: int, height: int, width: int):
    f = arch.vae.downsample_factor
    return (n, arch.unet.in_channels, height // f, width // f)


def sample_latents(pipe, arch: ModelArch, cond_ids: np.ndarray, uncond_ids: Optional[np.ndarray],
                   settings: SampleSettings, key: Sequence[int]) -> np.ndarray:
    """Sample one batch of latents. `key` names the batch among all batches of a run (prompt index,
    iteration), so that the same seed and key give the same initial noise on every backend.
    Ids are [n, chunks * context_length] (one chunk: the usual [n, 77]); with guidance, the
    negative ids must have as many chunks as the prompt's (see common.prompts)."""
    streams = Streams(settings.seed)
    n = len(cond_ids)
    use_cfg = uncond_ids is not None and settings.scale != 1.0
    context = encode_chunks(pipe, np.concatenate([uncond_ids, cond_ids]) if use_cfg else np.asarray(cond_ids),
                            arch.text.context_length)
    sampler = make_sampler(settings.sampler, NoiseSchedule(arch.schedule), settings.steps, eta=settings.eta)

    def model_fn(x: np.ndarray, t: int) -> np.ndarray:
        if not use_cfg:
            return pipe.predict(x, t, context)
        out = pipe.predict(np.concatenate([x, x]), t, context)
        return guided(out[:n], out[n:], settings.scale)

    def noise_fn(i: int, shape) -> np.ndarray:
        return streams.normal("sample.step", shape, *key, i)

    x_T = streams.normal("sample.init", latent_shape(arch, n, settings.height, settings.width), *key)
    return denoise(model_fn, x_T, sampler, noise_fn=noise_fn, progress=settings.progress)


def text_to_image(pipe, arch: ModelArch, tokenizer, prompts: Sequence[str], negative_prompts: Sequence[str],
                  settings: SampleSettings, n_samples: int = 1, n_iter: int = 1, fixed_code: bool = False,
                  key_offset: int = 0, long_prompts: bool = False) -> Iterator[np.ndarray]:
    """Yield uint8 NHWC batches: for each prompt, n_iter batches of n_samples images. Prompts
    longer than the text encoder's window are truncated (with a warning) unless `long_prompts`
    (then encoded in chunks, see common.prompts)."""
    for p, (prompt, negative) in enumerate(zip(prompts, negative_prompts)):
        cond, uncond = prompt_ids(tokenizer, prompt, long_prompts), None
        if settings.scale != 1.0:       # guidance batches both: give them the same chunk count
            negative_ids = prompt_ids(tokenizer, negative, long_prompts, what="negative prompt")
            cond, uncond = same_chunk_count(tokenizer, cond, negative_ids)
            uncond = np.tile(uncond.reshape(1, -1), (n_samples, 1))
        cond = np.tile(cond.reshape(1, -1), (n_samples, 1))
        for it in range(n_iter):
            key = (0, 0) if fixed_code else (key_offset + p, it)
            latents = sample_latents(pipe, arch, cond, uncond, settings, key)
            yield to_uint8(pipe.decode(latents))


def pad_negatives(prompts: List[str], negatives: List[str]) -> List[str]:
    """One negative prompt per prompt: a single one is shared, a short list is padded with ''."""
    if len(negatives) == 1:
        return negatives * len(prompts)
    return (negatives + [""] * len(prompts))[:len(prompts)]
