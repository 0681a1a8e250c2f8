#!/usr/bin/env python
"""DINO score (subject fidelity, the DreamBooth paper's preferred metric): the mean cosine
similarity between the DINO ViT-S/16 CLS embeddings of every generated image and every real
image, on PyTorch (--backend cuda, timm) or MindSpore (--backend ascend):

    python tools/eval/eval_dino_score.py --ckpt_path models/dino_deitsmall16_pretrain.pth \\
        --gen_image_path_or_dir output/samples --real_image_path_or_dir datasets/dog

Weights come only from a local file (DINO's released dino_deitsmall16_pretrain.pth, a timm
vit_small_patch16_224 state dict, .safetensors, or a MindSpore .ckpt of the same names).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _path  # noqa: F401,E402  (repository root on sys.path)

from common.evaluation import arguments as ea  # noqa: E402
from common.cli import run_cli
from common.evaluation.models import DEFAULT_DINO, load_dino_source
from common.evaluation.scores import load_dino_encoder, IMAGENET_MEAN, IMAGENET_STD


def build_parser():
    p = ea.parser("eval_dino_score.py", __doc__)
    g = p.add_argument_group("inputs")
    g.add_argument("--gen_image_path_or_dir", required=True, help="generated image, or a folder of them")
    g.add_argument("--real_image_path_or_dir", required=True, help="real (subject) image, or a folder of them")
    g = p.add_argument_group("DINO model")
    g.add_argument("--ckpt_path", default=None, help="DINO ViT weights (a local file; nothing is downloaded)")
    g.add_argument("--model_name", default=DEFAULT_DINO,
                   help="timm ViT name: vit_small_patch16_224 (DINO ViT-S/16, default), vit_small_patch8_224, "
                        "vit_base_patch16_224, vit_base_patch8_224, or DINO's dino_vits16 / dino_vits8 / "
                        "dino_vitb16 / dino_vitb8")
    g.add_argument("--config", default=None,
                   help="architecture file instead of --model_name: JSON/yaml with image_size, patch_size, "
                        "width, layers, heads (and optionally mlp_ratio)")
    ea.add_common_flags(p, result_default=False)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ea.setup(args)
    return ea.pairwise_main(args, "dino", "DINO", lambda: load_dino_source(args.ckpt_path, args.model_name, args.config), load_dino_encoder, IMAGENET_MEAN, IMAGENET_STD)


if __name__ == "__main__":
    run_cli(main)
