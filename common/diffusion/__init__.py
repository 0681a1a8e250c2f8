"""Diffusion arithmetic shared by both backends (may import common.* and common.formats).

- schedule: the noise schedule (betas, alphas, SNR, eps/v targets)
- samplers: DDIM, PLMS, DPM-Solver++, Euler, Euler ancestral, UniPC in numpy
- generate: the text-to-image loop around a backend's Pipeline (prompts, guidance, seeds)
"""
