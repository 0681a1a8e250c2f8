#!/usr/bin/env python
"""Pretrain a tiny Stable Diffusion from scratch on the synthetic world (tools/synthetic_world.py),
with PyTorch on the CPU (or a GPU: --device cuda), in two stages:

1. the VAE (reconstruction + a small KL term), then rescaled exactly (its quant convolutions) so
   that its latents times the config's scale_factor have unit variance, as SD's do;
2. the UNet and the text encoder together, with the diffusion loss on the frozen VAE's latents,
   10% empty captions (classifier-free guidance needs them) and an EMA of the weights.

    python tools/pretrain_tiny.py --output tiny-v1-world.safetensors [--config configs/tiny-v1-world.yaml] \\
        [--vae_steps 1200] [--unet_steps 8000] [--threads 2]

(assets/tiny_world/README.md gives the commands that made the committed model.)

The result is an original-layout single file (fp16), which both backends load like any SD
checkpoint. Everything is seeded; the same command on the same machine gives the same file.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import time

import numpy as np

import _path  # noqa: F401  (repository root on sys.path)
from common.cli import run_cli
from common.config import UserArgumentParser, add_bool
from common.errors import UserError

logger = logging.getLogger("pretrain_tiny")


def world_images(count: int, size: int, seed: int):
    """(uint8 N x size x size x 3 images, captions) of the first `count` scenes of the world."""
    import synthetic_world as world
    from tqdm.auto import tqdm

    items = world.scenes(count, seed)
    images = np.stack([np.asarray(world.render(scene, size)) for scene, _ in tqdm(items, desc="world", mininterval=5)])
    return images, [caption for _, caption in items]


def to_model(images_u8, torch, device):
    """uint8 NHWC -> float NCHW in [-1, 1] on `device`."""
    return torch.from_numpy(images_u8).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then a cosine from `peak` down to `floor` * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, images, args, torch):
    """Stage 1: reconstruction (MSE) + KL, Adam, cosine schedule."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = np.random.default_rng([args.seed, 10])
    bar = tqdm(range(args.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        x = to_model(images[gen.integers(0, len(images), args.batch_size)], torch, args.device)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=None)).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + args.vae_kl * kl
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}")
    return float(mse.item())


def rescale_vae(vae, images, scale_factor: float, torch, device) -> float:
    """Scale the VAE's latent space by k so that std(scale_factor * mean) == 1: the mean rows of
    quant_conv times k, the log-variance biases + 2 ln k, post_quant_conv's inputs divided by k.
    The decoder's output for a scaled latent is unchanged. Returns k."""
    with torch.no_grad():
        means = torch.cat([vae.encode(to_model(images[i:i + 256], torch, device)).latent_dist.mean
                           for i in range(0, min(len(images), 2048), 256)])
        k = 1.0 / (scale_factor * float(means.std()))
        c = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    return k


def encode_world(vae, images, torch, device):
    """The frozen VAE's posterior (mean, std) of every image, float16 to save memory."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            post = vae.encode(to_model(images[i:i + 256], torch, device)).latent_dist
            means.append(post.mean.half())
            stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text, arch, latents, captions, args, torch):
    """Stage 2: UNet and text encoder on the diffusion loss, EMA of both."""
    from tqdm.auto import tqdm

    from common.diffusion.schedule import NoiseSchedule
    from common.tokenizer import tokenizer_for

    sched = NoiseSchedule(arch.schedule)
    dev = args.device
    a_t = torch.from_numpy(sched.sqrt_alphas_cumprod).to(dev)
    b_t = torch.from_numpy(sched.sqrt_one_minus_alphas_cumprod).to(dev)
    tokenizer = tokenizer_for(arch.text)
    ids = torch.from_numpy(tokenizer(list(captions)).astype(np.int64)).to(dev)
    empty = torch.from_numpy(tokenizer([""]).astype(np.int64))[0].to(dev)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)]
    gen = np.random.default_rng([args.seed, 20])
    torch.manual_seed(args.seed + 20)
    mean, std = latents
    bar = tqdm(range(args.unet_steps), desc="unet+text", mininterval=5)
    avg = None
    for step in bar:
        idx = torch.from_numpy(gen.integers(0, len(mean), args.batch_size)).to(dev)
        z = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, device=dev)) * arch.scale_factor
        t = torch.from_numpy(gen.integers(0, sched.num_train_timesteps, args.batch_size)).to(dev)
        noise = torch.randn_like(z)
        a, b = a_t[t].view(-1, 1, 1, 1), b_t[t].view(-1, 1, 1, 1)
        noisy = a * z + b * noise
        target = noise if arch.schedule.parameterization == "eps" else a * noise - b * z
        batch_ids = ids[idx].clone()
        batch_ids[torch.from_numpy(gen.random(args.batch_size) < args.caption_dropout).to(dev)] = empty
        context = text(batch_ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.unet_steps, args.unet_lr, 200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, slow in ((unet, ema[0]), (text, ema[1])):
                for p, q in zip(live.parameters(), slow.parameters()):
                    q.lerp_(p, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{avg:.4f}")
    return ema[0], ema[1], avg


def run_metadata(arch, command: str, minutes: float, earlier=None) -> dict:
    """The output's safetensors metadata; a run that builds on an earlier output (--init_from,
    --vae_from) keeps the earlier runs' commands, in order, and adds up the minutes."""
    if earlier:
        command = f"{earlier.get('command', '?')} ; then {command}"
        minutes += float(earlier.get("minutes", 0))
    return {"description": f"tiny SD ({arch.version}) pretrained on the synthetic world by tools/pretrain_tiny.py",
            "command": command, "minutes": f"{minutes:.1f}"}


def main() -> int:
    p = UserArgumentParser(prog="pretrain_tiny.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-v1-world.yaml", help="architecture yaml")
    p.add_argument("--output", required=True, help="the pretrained model, an original-layout .safetensors")
    p.add_argument("--scenes", type=int, default=20000, help="number of world scenes to train on")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the initial weights and the draws")
    p.add_argument("--batch_size", type=int, default=16, help="images per step, both stages")
    p.add_argument("--vae_steps", type=int, default=800, help="VAE training steps")
    p.add_argument("--vae_from", default=None,
                   help="take the (already rescaled) VAE of an earlier output of this script and skip stage 1 "
                        "(like --init_from, the earlier run's command and minutes go into the metadata first)")
    p.add_argument("--init_from", default=None,
                   help="continue an earlier output of this script: its VAE is kept (stage 1 skipped) and its "
                        "UNet and text encoder are trained --unet_steps more (a fresh warm-up and cosine schedule)")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate")
    p.add_argument("--vae_kl", type=float, default=1e-4, help="weight of the KL term (per latent element)")
    p.add_argument("--unet_steps", type=int, default=4000, help="UNet + text encoder training steps")
    p.add_argument("--unet_lr", type=float, default=5e-4, help="UNet + text encoder peak learning rate")
    p.add_argument("--caption_dropout", type=float, default=0.1, help="fraction of empty captions")
    p.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu",
                   help="torch device: cpu, or cuda (a GPU trains the same tiny model many times faster, e.g. "
                        "--init_from with --unet_steps 50000 --batch_size 64; results differ from the CPU's in the "
                        "last bits, so the same command gives the same file only on the same kind of device)")
    add_bool(p, "--overwrite", default=False, help="replace an existing output file")
    args = p.parse_args()
    if os.path.exists(args.output) and not args.overwrite:
        raise UserError(f"{args.output} already exists (pass --overwrite True to replace it)")

    import torch

    from backends.cuda.models import build_models, load_weights, module_weights
    from common.arch import load_arch
    from common.formats import keymap
    from common.formats.checkpoint_io import load_state_dict, safetensors_metadata, save_state_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f"--device {args.device}: {e}") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: torch sees no CUDA GPU here")
    torch.manual_seed(args.seed)
    arch = load_arch(args.config)
    started = time.time()
    images, captions = world_images(args.scenes, arch.image_size, args.seed)
    unet, vae, text = (m.to(args.device) for m in build_models(arch))    # loading copies onto the device
    earlier = args.init_from or args.vae_from
    if earlier:
        parts = keymap.ldm_to_diffusers({k: v.astype(np.float32) for k, v in load_state_dict(earlier).items()}, arch)
        load_weights(vae, parts["vae"], "vae")
        vae.requires_grad_(False).eval()
        if args.init_from:
            load_weights(unet, parts["unet"], "unet")
            load_weights(text, parts["text_encoder"], "text_encoder")
    else:
        mse = train_vae(vae, images, args, torch)
        vae.requires_grad_(False).eval()
        k = rescale_vae(vae, images, arch.scale_factor, torch, args.device)
        logger.info("VAE: reconstruction MSE %.4f, latents rescaled by %.3f", mse, k)
    latents = encode_world(vae, images, torch, args.device)
    del images
    unet_ema, text_ema, loss = train_unet(unet, text, arch, latents, captions, args, torch)
    logger.info("UNet + text encoder: loss %.4f (running mean at the end)", loss)
    parts = {"unet": module_weights(unet_ema), "vae": module_weights(vae), "text_encoder": module_weights(text_ema)}
    weights = {k: v.astype(np.float16) for k, v in keymap.diffusers_to_ldm(parts, arch).items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    minutes = (time.time() - started) / 60
    save_state_dict(args.output, weights, overwrite=True, metadata=run_metadata(
        arch, " ".join(sys.argv[1:]), minutes, safetensors_metadata(earlier) if earlier else None))
    n = sum(int(v.size) for v in weights.values())
    print(f"wrote {args.output}: {n / 1e6:.2f}M parameters, fp16, {os.path.getsize(args.output) / 1e6:.1f} MB, "
          f"{minutes:.0f} min")
    return 0


if __name__ == "__main__":
    run_cli(main)
