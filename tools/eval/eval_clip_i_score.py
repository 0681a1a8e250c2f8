#!/usr/bin/env python
"""CLIP-I (subject fidelity): the mean cosine similarity between the CLIP image embeddings of every
generated image and every real image (the full generated x real matrix, as MindONE defines it),
with MindONE's flags, on PyTorch (--backend cuda) or MindSpore (--backend ascend):

    python tools/eval/eval_clip_i_score.py --ckpt_path models/ViT-B-16.safetensors \\
        --gen_image_path_or_dir output/samples --real_image_path_or_dir datasets/dog
"""
from __future__ import annotations

import _eval_args as ea
from common.cli import run_cli
from common.eval_models import load_clip_source
from common.evaluation import (CLIP_MEAN, CLIP_STD, DEFINITIONS, PREPROCESS_HELP, check_images, describe_encoder,
                               evaluate_pairwise, list_eval_images, load_clip_encoder, write_json)


def build_parser():
    p = ea.parser("eval_clip_i_score.py", __doc__)
    g = p.add_argument_group("inputs")
    g.add_argument("--gen_image_path_or_dir", required=True, help="generated image, or a folder of them")
    g.add_argument("--real_image_path_or_dir", required=True, help="real (subject) image, or a folder of them")
    ea.add_clip_flags(p)
    ea.add_common_flags(p, result_default=False)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ea.setup(args)
    gen = list_eval_images(args.gen_image_path_or_dir, "generated")
    real = list_eval_images(args.real_image_path_or_dir, "real")
    check_images(gen + real)
    source = load_clip_source(args.ckpt_path, args.model_name, args.config)
    encoder = load_clip_encoder(args.backend, source)
    result = evaluate_pairwise(encoder, gen, real, CLIP_MEAN, CLIP_STD, args.batch_size)
    if not args.quiet:
        for row in result["per_image"]:
            print(f"{row['image_path']}  {row['cosine']:.4f}  (mean over {len(real)} real images)")
    print(f"CLIP-I ({source.arch.name}, backend {args.backend}, {len(gen)} generated x {len(real)} real): "
          f"cosine {result['cosine']:.4f} | x100 {result['x100']:.2f}")
    if args.save_result:
        per_image = result.pop("per_image")
        write_json(args.result_path, {"metric": "clip_i", "scores": result, "real_images": real,
                                      "per_image": per_image, "model": describe_encoder(encoder, source),
                                      "definitions": DEFINITIONS, "preprocessing": PREPROCESS_HELP})
        print(f"results: {args.result_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
