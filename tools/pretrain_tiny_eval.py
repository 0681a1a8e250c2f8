#!/usr/bin/env python
"""Train the tiny evaluation models on the synthetic world (tools/synthetic_world.py), so that
CLIP-T, CLIP-I and DINO scores mean something within that world:

* world_clip: a CLIP (open_clip's architecture: ViT image tower, CLIP text transformer) trained
  contrastively on the world's images and captions;
* world_dino: a ViT in DINO's architecture and file layout (timm names, CLS embedding), trained
  self-supervised on the world's images: two random crops of an image must embed closer to each
  other than to any other image of the batch (SimCLR's loss; no labels, no captions). Colours are
  not jittered, so colour stays part of an image's identity.

    python tools/pretrain_tiny_eval.py --output_dir assets/tiny_world [--steps 1500] [--threads 2]

writes world_clip.json + world_clip.safetensors and world_dino.json + world_dino.safetensors,
which the evaluation scripts read with --config/--ckpt_path and --dino_config/--dino_ckpt_path.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import _path  # noqa: F401  (repository root on sys.path)
from pretrain_tiny import cosine_lr, world_images
from common.cli import run_cli
from common.config import UserArgumentParser, add_bool
from common.errors import UserError

WORLD_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "layers": 4, "head_width": 24},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    "description": "tiny CLIP trained on the synthetic world by tools/pretrain_tiny_eval.py: its scores "
                   "are meaningful within that world only",
}
WORLD_DINO_CONFIG = {
    "image_size": 64, "patch_size": 8, "width": 96, "layers": 4, "heads": 4, "mlp_ratio": 4.0,
    "description": "tiny ViT in DINO's layout, trained self-supervised on the synthetic world by "
                   "tools/pretrain_tiny_eval.py: its scores are meaningful within that world only",
}


def _normalise(images_u8, mean, std, torch):
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _info_nce(a, b, scale, torch):
    """Symmetric cross-entropy of the a x b cosine matrix (row i matches column i)."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    logits = scale * a @ b.t()
    labels = torch.arange(len(a))
    return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2


def train_clip(images, captions, args, torch):
    import open_clip
    from tqdm.auto import tqdm

    from common.evaluation.models import clip_arch_from_dict
    from common.evaluation.scores import CLIP_MEAN, CLIP_STD
    from common.tokenizer import CLIPTokenizer

    arch = clip_arch_from_dict(WORLD_CLIP_CONFIG, "world_clip", "world_clip.json")
    model = open_clip.CLIP(**arch.open_clip_config())
    tokenizer = CLIPTokenizer(context_length=arch.context_length, pad_token=0)
    ids = torch.from_numpy(tokenizer(list(captions)).astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    gen = np.random.default_rng([args.seed, 30])
    bar = tqdm(range(args.steps), desc="clip", mininterval=5)
    for step in bar:
        idx = gen.choice(len(images), args.batch_size, replace=False)
        x = _normalise(images[idx], CLIP_MEAN, CLIP_STD, torch)
        loss = _info_nce(model.encode_image(x), model.encode_text(ids[idx]), model.logit_scale.exp(), torch)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, 100, floor=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model, float(loss.item())


def _random_crops(images_u8, gen, torch):
    """A random resized crop (40-100% of the side) and a random flip of each image, same size."""
    n, h, w, _ = images_u8.shape
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float()
    out = torch.empty_like(x)
    for i in range(n):
        side = int(h * gen.uniform(0.6, 1.0))
        top, left = gen.integers(0, h - side + 1), gen.integers(0, w - side + 1)
        crop = x[i:i + 1, :, top:top + side, left:left + side]
        crop = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        out[i] = crop[0].flip(-1) if gen.random() < 0.5 else crop[0]
    return out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def train_dino(images, args, torch):
    import timm
    from tqdm.auto import tqdm

    from common.evaluation.models import dino_arch
    from common.evaluation.scores import IMAGENET_MEAN, IMAGENET_STD

    cfg_path = os.path.join(args.output_dir, "world_dino.json")
    arch = dino_arch(config=cfg_path)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **arch.timm_kwargs())
    head = torch.nn.Sequential(torch.nn.Linear(arch.width, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    gen = np.random.default_rng([args.seed, 40])
    bar = tqdm(range(args.steps), desc="dino", mininterval=5)
    for step in bar:
        batch = images[gen.choice(len(images), args.batch_size, replace=False)]
        views = [_normalise(_random_crops(batch, gen, torch), IMAGENET_MEAN, IMAGENET_STD, torch) for _ in range(2)]
        loss = _info_nce(head(model(views[0])), head(model(views[1])), 1 / 0.2, torch)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, 100, floor=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model, float(loss.item())


def main() -> int:
    p = UserArgumentParser(prog="pretrain_tiny_eval.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="folder for the four files")
    p.add_argument("--scenes", type=int, default=20000, help="number of world scenes to train on")
    p.add_argument("--seed", type=int, default=1, help="seed of the world and of the training draws")
    p.add_argument("--steps", type=int, default=1500, help="training steps of each model")
    p.add_argument("--batch_size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_bool(p, "--overwrite", default=False, help="replace existing files")
    args = p.parse_args()
    names = ("world_clip.json", "world_clip.safetensors", "world_dino.json", "world_dino.safetensors")
    paths = [os.path.join(args.output_dir, n) for n in names]
    if not args.overwrite:
        for path in paths:
            if os.path.exists(path):
                raise UserError(f"{path} already exists (pass --overwrite True to replace it)")

    import torch

    from common.formats.checkpoint_io import save_state_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    for path, cfg in ((paths[0], WORLD_CLIP_CONFIG), (paths[2], WORLD_DINO_CONFIG)):
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    images, captions = world_images(args.scenes, 64, args.seed)
    for path, (model, loss), cfg in ((paths[1], train_clip(images, captions, args, torch), WORLD_CLIP_CONFIG),
                                     (paths[3], train_dino(images, args, torch), WORLD_DINO_CONFIG)):
        weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        save_state_dict(path, weights, overwrite=True, metadata={"description": cfg["description"],
                                                                "final_loss": f"{loss:.4f}"})
        print(f"wrote {path}: final loss {loss:.3f}")
    print(f"done in {(time.time() - started) / 60:.0f} min")
    return 0


if __name__ == "__main__":
    run_cli(main)
