#!/usr/bin/env python
"""Create a deterministic random Stable Diffusion checkpoint in the original single-file layout
(model.diffusion_model.*, first_stage_model.*, cond_stage_model.*) for any architecture config.

    python tools/make_tiny_model.py --config configs/tiny-v2-inference.yaml --output models/tiny-v2.safetensors

The tiny configs give a few-MB model that the demo and the tests train on CPU in seconds; the same
seed always gives the same bytes, on every machine and for both backends.
"""
import argparse
import os

import _path  # noqa: F401  (repository root on sys.path)
from common.cli import run_cli
from common.config import UserArgumentParser, add_bool


def main() -> int:
    p = UserArgumentParser(prog="make_tiny_model.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="architecture yaml, e.g. configs/tiny-v1-inference.yaml")
    p.add_argument("--output", required=True, help="output file: .safetensors (default) or .ckpt")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="stored precision")
    add_bool(p, "--overwrite", default=False, help="replace an existing output file")
    args = p.parse_args()

    import numpy as np

    from common.arch import load_arch
    from common.formats.checkpoint_io import save_state_dict
    from common.formats.init_weights import random_weights

    arch = load_arch(args.config)
    weights = random_weights(arch, args.seed)
    if args.dtype == "fp16":
        weights = {k: v.astype(np.float16) for k, v in weights.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_state_dict(args.output, weights, overwrite=args.overwrite)
    n = sum(int(v.size) for v in weights.values())
    print(f"wrote {args.output}: {len(weights)} tensors, {n / 1e6:.2f}M parameters ({arch.version}, {args.config})")
    return 0


if __name__ == "__main__":
    run_cli(main)
