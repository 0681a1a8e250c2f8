#!/usr/bin/env python
"""Write tiny random evaluation models (a CLIP of open_clip's architecture and a DINO ViT of
timm's) with their architecture files, for tests and the demo's evaluation step:

    python tools/make_tiny_eval_models.py --output_dir demo_output/eval_models

writes tiny_clip.json + tiny_clip.safetensors (open_clip names; use with --config / --ckpt_path)
and tiny_dino.json + tiny_dino.safetensors (timm names; --dino_config / --dino_ckpt_path).
The weights are random (numpy, deterministic per seed): scores computed with them say nothing
about image quality, and the architecture files say so, which the evaluation report repeats.
"""
import argparse
import json
import os

import _path  # noqa: F401  (repository root on sys.path)
from common.cli import run_cli
from common.config import UserArgumentParser, add_bool
from common.errors import UserError


def write_tiny_models(output_dir: str, seed: int = 0, overwrite: bool = False) -> dict:
    """Write the four files; returns {"clip_config", "clip_ckpt", "dino_config", "dino_ckpt"} paths."""
    from common.formats.checkpoint_io import save_state_dict
    from common.evaluation.models import (TINY_CLIP_CONFIG, TINY_DINO_CONFIG, clip_arch_from_dict,
                                          clip_parameter_shapes, dino_arch, dino_parameter_shapes, random_weights)

    os.makedirs(output_dir, exist_ok=True)
    paths = {k: os.path.join(output_dir, name) for k, name in
             (("clip_config", "tiny_clip.json"), ("clip_ckpt", "tiny_clip.safetensors"),
              ("dino_config", "tiny_dino.json"), ("dino_ckpt", "tiny_dino.safetensors"))}
    if not overwrite:
        for path in paths.values():
            if os.path.exists(path):
                raise UserError(f"{path} already exists (pass --overwrite True to replace it)")
    for key, cfg in (("clip_config", TINY_CLIP_CONFIG), ("dino_config", TINY_DINO_CONFIG)):
        with open(paths[key], "w") as f:
            json.dump(cfg, f, indent=2)
    clip = clip_arch_from_dict(TINY_CLIP_CONFIG, "tiny_clip", paths["clip_config"])
    dino = dino_arch(config=paths["dino_config"])
    save_state_dict(paths["clip_ckpt"], random_weights(clip_parameter_shapes(clip), seed),
                    overwrite=True, metadata={"description": clip.description})
    save_state_dict(paths["dino_ckpt"], random_weights(dino_parameter_shapes(dino), seed + 1),
                    overwrite=True, metadata={"description": dino.description})
    return paths


def main() -> int:
    p = UserArgumentParser(prog="make_tiny_eval_models.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="folder for the four files")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    add_bool(p, "--overwrite", default=False, help="replace existing files")
    args = p.parse_args()
    paths = write_tiny_models(args.output_dir, args.seed, args.overwrite)
    print("wrote tiny random evaluation models (scores from them are meaningless):")
    for key, path in paths.items():
        print(f"  {key:12s} {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
