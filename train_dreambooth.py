#!/usr/bin/env python
"""DreamBooth / vanilla / LoRA fine-tuning of Stable Diffusion on PyTorch/CUDA or MindSpore/Ascend.

    python train_dreambooth.py --train_config configs/train/train_config_dreambooth_v2.yaml \\
        --backend cuda --instance_data_dir datasets/dog --instance_prompt "a photo of sks dog" \\
        --class_data_dir temp_class_images/dog --class_prompt "a photo of a dog" \\
        --pretrained_model_path models/sd_v2_base.ckpt --output_path output/dreambooth_dog
"""
from common.cli import run_cli, setup_logging
from common.training.train_args import parse_train_args


def main() -> int:
    args = parse_train_args()
    setup_logging(args.log_level)
    from backends import load_backend
    from common.training.train_loop import run_training

    result = run_training(args, load_backend(args.backend))
    print(f"checkpoint: {result['checkpoint']}")
    print(f"run folder: {result['output_path']} (loss.csv, ckpt/, validation/)")
    return 0


if __name__ == "__main__":
    run_cli(main)
