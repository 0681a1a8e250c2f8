#!/usr/bin/env python
"""CLIP-I (subject fidelity): the mean cosine similarity between the CLIP image embeddings of every
generated image and every real image (the full generated x real matrix, as MindONE defines it),
with MindONE's flags, on PyTorch (--backend cuda) or MindSpore (--backend ascend):

    python tools/eval/eval_clip_i_score.py --ckpt_path models/ViT-B-16.safetensors \\
        --gen_image_path_or_dir output/samples --real_image_path_or_dir datasets/dog
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _path  # noqa: F401,E402  (repository root on sys.path)

from common.evaluation import arguments as ea  # noqa: E402
from common.cli import run_cli
from common.evaluation.models import load_clip_source
from common.evaluation.scores import load_clip_encoder, CLIP_MEAN, CLIP_STD


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
    return ea.pairwise_main(args, "clip_i", "CLIP-I", lambda: load_clip_source(args.ckpt_path, args.model_name, args.config), load_clip_encoder, CLIP_MEAN, CLIP_STD)


if __name__ == "__main__":
    run_cli(main)
