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

import _eval_args as ea
from common.cli import run_cli
from common.eval_models import DEFAULT_DINO, load_dino_source
from common.evaluation import (DEFINITIONS, IMAGENET_MEAN, IMAGENET_STD, PREPROCESS_HELP, check_images,
                               describe_encoder, evaluate_pairwise, list_eval_images, load_dino_encoder, write_json)


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
    gen = list_eval_images(args.gen_image_path_or_dir, "generated")
    real = list_eval_images(args.real_image_path_or_dir, "real")
    check_images(gen + real)
    source = load_dino_source(args.ckpt_path, args.model_name, args.config)
    encoder = load_dino_encoder(args.backend, source)
    result = evaluate_pairwise(encoder, gen, real, IMAGENET_MEAN, IMAGENET_STD, args.batch_size)
    if not args.quiet:
        for row in result["per_image"]:
            print(f"{row['image_path']}  {row['cosine']:.4f}  (mean over {len(real)} real images)")
    print(f"DINO ({source.arch.name}, backend {args.backend}, {len(gen)} generated x {len(real)} real): "
          f"cosine {result['cosine']:.4f} | x100 {result['x100']:.2f}")
    if args.save_result:
        per_image = result.pop("per_image")
        write_json(args.result_path, {"metric": "dino", "scores": result, "real_images": real,
                                      "per_image": per_image, "model": describe_encoder(encoder, source),
                                      "definitions": DEFINITIONS, "preprocessing": PREPROCESS_HELP})
        print(f"results: {args.result_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
