"""Flags of train_dreambooth.py: MindONE's names and defaults, plus what diffusers users expect.

MindONE's keys keep their meaning. Where MindONE parses a key but ignores it (warmup_steps,
end_learning_rate, decay_steps) we honour it, with a default that reproduces MindONE's behaviour.
diffusers spellings are accepted as aliases of the same setting (e.g. --output_dir).
"""
from __future__ import annotations

import argparse
import re
from typing import Optional, Sequence

from common.config import (UserArgumentParser, add_bool, backend_name, count, non_negative, positive,
                           ranged, parse_with_config)
from common.errors import UserError
from common.formats.lora import LAYER_SETS, is_layer_set
from common.training.data import INTERPOLATIONS
from common.training.lr_schedules import SCHEDULERS
from common.diffusion.samplers import SAMPLERS

# diffusers' --validation_scheduler names: DDPM's ancestral sampling is DDIM with eta 1
_DIFFUSERS_SAMPLERS = {"DPMSolverMultistepScheduler": ("dpm_solver_pp", 0.0), "DDPMScheduler": ("ddim", 1.0)}


def validation_sampler(value: str) -> tuple:
    if value in _DIFFUSERS_SAMPLERS:
        return _DIFFUSERS_SAMPLERS[value]
    if value in SAMPLERS:
        return value, 0.0
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(SAMPLERS + tuple(_DIFFUSERS_SAMPLERS))}, got {value!r}")


# diffusers flags that only make sense with the Hugging Face Hub, or for DeepFloyd IF: a one-line error
HUB_FLAGS = ("--push_to_hub", "--hub_token", "--hub_model_id", "--revision", "--variant", "--tokenizer_name")
IF_FLAGS = ("--class_labels_conditioning", "--validation_images")


def memory_size(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?GB", str(value)):
        raise argparse.ArgumentTypeError(f"expected a size such as 30GB, got {value!r}")
    return str(value)


def layer_set(value: str) -> str:
    if not is_layer_set(value):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LAYER_SETS)} or module names such as "
                                         f"to_q,to_k,to_v,to_out.0; got {value!r}")
    return value


TRAIN_DESCRIPTION = """\
Fine-tune Stable Diffusion 1.x/2.x on a few images of a subject: vanilla fine-tuning
(--with_prior_preservation False), DreamBooth with class-prior preservation, or LoRA (--use_lora True),
on PyTorch/CUDA (--backend cuda) or MindSpore/Ascend (--backend ascend).
Every key of --train_config is also a flag; flags given on the command line win."""


def build_train_parser() -> argparse.ArgumentParser:
    p = UserArgumentParser(prog="train_dreambooth.py", description=TRAIN_DESCRIPTION,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--train_config", default="", help="yaml with MindONE's keys; its values become defaults")
    g.add_argument("--backend", type=backend_name, default="cuda",
                   help="cuda (PyTorch; CUDA when present, else CPU) or ascend (MindSpore; Ascend when present, else CPU)")
    g.add_argument("--model_config", "--config", default=None,
                   help="architecture yaml (LDM style), relative to the working dir or the repository; default: "
                        "read from a diffusers folder's configs, else configs/v2-inference.yaml (MindONE's default)")
    g.add_argument("--pretrained_model_path", "--pretrained_model_name_or_path", default="",
                   help="base checkpoint: original single-file .safetensors/.ckpt, a MindONE .ckpt or a diffusers folder")
    g.add_argument("--output_path", "--output_dir", default="output",
                   help="run folder: checkpoints in ckpt/, loss.csv, validation/, train_config.yaml")
    g.add_argument("--resume", default=None, nargs="?", const="latest",
                   help="continue the run in output_path from its last saved state ('latest' or True), "
                        "or from a given ckpt/train_state.json")
    add_bool(g, "--overwrite", default=False,
             help="start over even though output_path already holds a run (its checkpoints, loss.csv and TensorBoard logs are deleted)")
    g.add_argument("--seed", type=int, default=3407, help="seed of every random stream (data, noise, timesteps)")
    g.add_argument("--mode", type=int, default=0, choices=(0, 1),
                   help="ascend backend: 0 = GRAPH_MODE, 1 = PYNATIVE_MODE")
    add_bool(g, "--use_parallel", default=False,
             help="data-parallel training (accelerate launch for cuda, msrun for ascend)")
    g.add_argument("--max_device_memory", type=memory_size, default="30GB",
                   help="ascend backend on Ascend: cap of MindSpore's device memory pool (MindONE's key, e.g. 30GB)")
    g.add_argument("--log_level", default="INFO", help="logging level (MindONE's 'logging.INFO' works too)")
    g.add_argument("--version", "-v", default=None, help="accepted for MindONE compatibility; the architecture comes from --model_config")
    add_bool(g, "--unet_initialize_random", default=False, help="drop the base UNet weights and train it from random init")
    # MindONE's Model.train data sinking: this trainer feeds every step itself, so there is nothing
    # to sink; the key stays readable in MindONE's configs but is not offered in --help.
    add_bool(g, "--dataset_sink_mode", default=False, help=argparse.SUPPRESS)

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", default=None, help="folder with the 3-10 subject images")
    g.add_argument("--instance_prompt", default=None, help="prompt naming the subject, e.g. 'a photo of sks dog'")
    g.add_argument("--class_data_dir", default=None, help="folder of class images (generated for the shortfall)")
    g.add_argument("--class_prompt", default=None, help="prompt of the subject's class, e.g. 'a photo of a dog'")
    g.add_argument("--num_class_images", type=ranged(int, low=0), default=200, help="class images wanted in class_data_dir")
    g.add_argument("--train_data_repeats", type=count, default=40, help="instance images are repeated this many times per epoch")
    add_bool(g, "--random_crop", default=False, help="random crop (and flip, see --random_flip) instead of center crop")
    add_bool(g, "--random_flip", default=None,
             help="horizontal flip with p=0.5; default follows --random_crop as in MindONE")
    add_bool(g, "--center_crop", default=None, help="diffusers spelling: True means --random_crop False")
    g.add_argument("--image_size", "--resolution", type=count, default=512, help="training resolution in pixels")
    g.add_argument("--dataloader_num_workers", type=ranged(int, low=0), default=2,
                   help="threads that decode, crop and flip the next batches while the device trains (0 = on the "
                        "training thread); decoded images are cached either way, and the batches are the same")
    g.add_argument("--tokenizer_path", default=None,
                   help="CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz, e.g. MindONE's); default: open_clip's copy when installed, else the vocabulary built into instant-clip-tokenizer")

    g = p.add_argument_group("method")
    add_bool(g, "--with_prior_preservation", default=True,
             help="DreamBooth class-prior preservation; False = vanilla fine-tuning on the instance images")
    g.add_argument("--prior_loss_weight", type=non_negative, default=1.0, help="weight of the class (prior) loss")
    add_bool(g, "--train_text_encoder", default=True, help="also fine-tune the text encoder (full, or LoRA with --lora_ft_text_encoder)")
    g.add_argument("--clip_skip", type=ranged(int, low=1, optional=True), default=None, metavar="N",
                   help="condition on the text encoder's N-th layer from the end, then its final layer norm (kohya/A1111 "
                        "clip skip; 1 = the model's own layer; diffusers' clip_skip=k is N=k+1; SD 2.x counts from its "
                        "penultimate layer, as kohya does). Skipped layers are saved unchanged. Sample with the same N. "
                        "Default: the model's own layer")
    add_bool(g, "--use_lora", default=False, help="train LoRA adapters instead of the full weights")
    add_bool(g, "--lora_ft_unet", default=True, help="LoRA on the UNet's --lora_layers")
    add_bool(g, "--lora_ft_text_encoder", default=False, help="LoRA on the text encoder's --lora_layers (needs --train_text_encoder)")
    g.add_argument("--lora_layers", type=layer_set, default="attention",
                   help="layers LoRA adapts: attention (to_q/to_k/to_v/to_out.0 and q/k/v/out_proj; MindONE's "
                        "and diffusers' default), kohya (kohya train_network's default: every Linear and 1x1 "
                        "conv of the UNet's transformer blocks - attention, feed-forward, proj_in/proj_out - "
                        "and the text encoder's attention and MLP), all (every Linear and Conv2d incl. the "
                        "ResNet 3x3 convs, time_emb_proj, down/upsamplers: LoCon), or a comma-separated list "
                        "of module names as diffusers' --lora_layers (e.g. to_q,to_v,ff.net.2)")
    g.add_argument("--lora_dropout", type=ranged(float, low=0, high=1, high_open=True), default=0.0,
                   help="dropout on the LoRA branch's input during training (peft's lora_dropout; 0 = off)")
    g.add_argument("--network_weights", default=None,
                   help="kohya's flag: start the adapters from this LoRA / LoCon file (any format we read; its "
                        "rank and alpha must match --lora_rank / --lora_alpha, its layers lie within --lora_layers)")
    g.add_argument("--base_weights", nargs="+", default=None,
                   help="kohya's flag: LoRA / LoCon / LoHa / LoKr files merged into the base model before training")
    g.add_argument("--base_weights_multiplier", nargs="+", type=float, default=None,
                   help="strength of each --base_weights file (one value for all, or one per file; default 1)")
    g.add_argument("--lora_rank", "--rank", type=count, default=4, help="LoRA rank")
    g.add_argument("--lora_alpha", type=ranged(float, low=0, low_open=True, optional=True), default=None,
                   help="LoRA alpha (scale = alpha/rank); default = rank, i.e. scale 1 as in MindONE and diffusers")
    add_bool(g, "--lora_fp16", default=True, help="ascend backend: LoRA layers compute in fp16 under mixed precision")
    g.add_argument("--offset_noise", type=non_negative, nargs="?", const=0.1, default=0.0,
                   help="offset-noise strength; the flag alone is diffusers' --offset_noise (0.1); 0 = off")
    g.add_argument("--snr_gamma", type=ranged(float, low=0, low_open=True, optional=True), default=None,
                   help="Min-SNR-gamma loss weighting (5.0 recommended); applied to instance and class halves alike")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=count, default=2, help="instance images per step per device (as many class images ride along)")
    g.add_argument("--epochs", "--num_train_epochs", type=count, default=8, help="epochs over the repeated instance images")
    g.add_argument("--max_train_steps", type=ranged(int, low=1, optional=True), default=None, help="total optimizer steps; overrides --epochs")
    g.add_argument("--start_learning_rate", "--learning_rate", type=positive, default=5e-6, help="learning rate (constant after warmup)")
    g.add_argument("--end_learning_rate", type=ranged(float, low=0, optional=True), default=None, help="must not exceed start_learning_rate; with --decay_steps, linear decay to it")
    g.add_argument("--decay_steps", type=ranged(int, low=0), default=0, help="steps of linear decay after warmup (0 = constant)")
    g.add_argument("--warmup_steps", "--lr_warmup_steps", type=ranged(int, low=0), default=0,
                   help="linear warmup steps (MindONE parses 200 but ignores it; 0 reproduces its constant LR)")
    g.add_argument("--lr_scheduler", default="mindone", choices=SCHEDULERS,
                   help="learning-rate schedule: mindone = linear warmup over --warmup_steps, then constant or a "
                        "linear decay to --end_learning_rate over --decay_steps (MindONE's keys); the others are "
                        "diffusers' get_scheduler schedules with their arguments (--lr_warmup_steps, --lr_num_cycles, "
                        "--lr_power), computed on the host for both backends")
    g.add_argument("--lr_num_cycles", type=ranged(int, low=1), default=1,
                   help="cosine_with_restarts: number of hard restarts (diffusers' flag)")
    g.add_argument("--lr_power", type=positive, default=1.0, help="polynomial: power of the decay (diffusers' flag)")
    g.add_argument("--lr_step_rules", default=None,
                   help="piecewise_constant: diffusers' step_rules, factors of the learning rate up to absolute "
                        "steps, then the last factor, e.g. '1:100,0.1:200,0.01'")
    g.add_argument("--optim", default="adamw", choices=("adamw", "adam"), help="optimizer (torch.optim.AdamW arithmetic on both backends)")
    g.add_argument("--betas", type=ranged(float, low=0, high=1, high_open=True), nargs=2, default=[0.9, 0.999], help="Adam betas")
    g.add_argument("--adam_beta1", type=ranged(float, low=0, high=1, high_open=True), default=None,
                   help="diffusers' spelling of the first of --betas")
    g.add_argument("--adam_beta2", type=ranged(float, low=0, high=1, high_open=True), default=None,
                   help="diffusers' spelling of the second of --betas")
    add_bool(g, "--use_8bit_adam", default=False,
             help="cuda backend: bitsandbytes' 8-bit AdamW (optimizer state in 8 bits, ~75%% less of its memory)")
    add_bool(g, "--fused_adam", default=None,
             help="cuda backend: torch's fused AdamW/Adam kernel (one kernel for all parameters; about 9x faster "
                  "optimizer step on a CPU). Default: on for a CUDA GPU; off on the CPU, where the update then equals "
                  "plain torch.optim.AdamW bit for bit (the fused CPU kernel differs in the last bit). The ascend "
                  "backend's update is part of its compiled graph and ignores the flag")
    add_bool(g, "--scale_lr", default=False,
             help="multiply the learning rate by accumulation steps x batch size x processes (diffusers' flag)")
    add_bool(g, "--set_grads_to_none", default=True,
             help="accepted for diffusers' commands: gradients are always freed (set to None) after each update")
    g.add_argument("--weight_decay", "--adam_weight_decay", type=non_negative, default=1e-2, help="decoupled weight decay")
    g.add_argument("--adam_epsilon", type=positive, default=1e-8, help="Adam epsilon")
    g.add_argument("--gradient_accumulation_steps", type=count, default=1, help="micro-batches per optimizer step")
    add_bool(g, "--clip_grad", default=None,
             help="clip the global gradient norm to --max_grad_norm; default: on when --max_grad_norm is given "
                  "(diffusers clips at 1.0 always, MindONE never: pass --max_grad_norm 1 for diffusers' behaviour)")
    g.add_argument("--max_grad_norm", type=positive, default=None, help="gradient-norm limit (default 1.0)")
    add_bool(g, "--allow_tf32", default=True,
             help="cuda backend on an Ampere or newer GPU: TF32 tensor cores for fp32 matmuls and convolutions "
                  "(diffusers' flag; on by default here)")
    g.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="auto = fp16 with loss scaling on GPU/Ascend, fp32 on CPU")
    g.add_argument("--init_loss_scale", type=positive, default=512, help="initial dynamic loss scale (fp16)")
    g.add_argument("--loss_scale_factor", type=ranged(float, low=1, low_open=True), default=2, help="loss-scale growth/backoff factor")
    g.add_argument("--scale_window", type=count, default=200, help="overflow-free steps before the loss scale grows")
    add_bool(g, "--gradient_checkpointing", default=False, help="recompute activations in backward to save memory")
    add_bool(g, "--use_ema", default=False, help="keep an EMA of the trained weights; checkpoints hold the EMA weights")
    g.add_argument("--ema_decay", type=ranged(float, low=0, high=1), default=0.9999, help="EMA decay (warmed up as 1 - exp(-updates/2000) like MindONE)")

    g = p.add_argument_group("outputs")
    g.add_argument("--ckpt_save_interval", type=count, default=1, help="save every N epochs")
    g.add_argument("--ckpt_save_steps", "--checkpointing_steps", type=ranged(int, low=1, optional=True), default=None,
                   help="save every N optimizer steps instead of every ckpt_save_interval epochs")
    g.add_argument("--ckpt_max_keep", "--checkpoints_total_limit", type=count, default=10,
                   help="keep the last k checkpoints (MindONE keeps 10)")
    g.add_argument("--save_format", default="safetensors", choices=("safetensors", "ckpt", "mindspore"),
                   help="full checkpoints as original-layout .safetensors, torch .ckpt, or (mindspore) "
                        "a MindONE-layout MindSpore .ckpt")
    g.add_argument("--validation_prompts", "--validation_prompt", nargs="*", default=None,
                   help="prompts sampled with a fixed seed every --validation_steps steps")
    g.add_argument("--validation_steps", type=count, default=100, help="steps between validation images")
    g.add_argument("--validation_epochs", type=ranged(int, low=1, optional=True), default=None,
                   help="validate every N epochs instead of every --validation_steps (diffusers' LoRA script)")
    g.add_argument("--num_validation_images", type=count, default=1,
                   help="images per validation prompt (diffusers' default is 4)")
    g.add_argument("--validation_scheduler", type=validation_sampler, default=None,
                   help="sampler of validation images: one of --sampler's names, or diffusers' "
                        "DPMSolverMultistepScheduler (= dpm_solver_pp) / DDPMScheduler (= ddim with eta 1); "
                        "default: --sampler")
    g.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "none"),
                   help="TensorBoard event files (loss, lr, grad norm, loss scale, validation images) in "
                        "output_path/--logging_dir, written without torch on either backend; none = off "
                        "(wandb / comet_ml are not offered: this tool runs offline)")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_path")
    g.add_argument("--callback_size", type=count, default=1,
                   help="read the step statistics from the device every N steps (loss.csv still gets a row per "
                        "step; a larger N means fewer device synchronisations)")

    g = p.add_argument_group("memory and speed savers")
    add_bool(g, "--cache_latents", default=False,
             help="encode each training image with the frozen VAE once and reuse its latent distribution "
                  "(kohya's flag; needs center crops and no flips, so every epoch sees the same pixels; the "
                  "posterior is still sampled per step, so the numbers are unchanged)")
    add_bool(g, "--pre_compute_text_embeddings", default=False,
             help="encode the instance and class prompts once with the frozen text encoder and free it "
                  "(diffusers' flag; needs --train_text_encoder False)")
    add_bool(g, "--enable_xformers_memory_efficient_attention", default=False,
             help="cuda backend: xFormers attention when installed; otherwise PyTorch's fused "
                  "scaled_dot_product_attention, which is used anyway")

    g = p.add_argument_group("diffusers compatibility")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="diffusers' spelling of --resume: 'latest' continues the run in --output_dir, or starts "
                        "a new one when there is none (as diffusers does); or a ckpt/train_state.json")
    g.add_argument("--tokenizer_max_length", type=ranged(int, low=2, optional=True), default=None,
                   help="tokens per prompt (BOS and EOS included), at most the text encoder's context length; "
                        "default: the context length (77)")
    add_bool(g, "--text_encoder_use_attention_mask", default=False,
             help="mask the padding tokens in the text encoder's attention (diffusers' flag)")
    g.add_argument("--image_interpolation_mode", default="bicubic", choices=tuple(INTERPOLATIONS),
                   help="resampling filter when resizing training images (diffusers' LoRA script uses lanczos)")
    add_bool(g, "--skip_save_text_encoder", default=False,
             help="full checkpoints leave out the (untrained) text encoder: smaller files that need the base "
                  "model's text encoder to be used (diffusers' flag; needs --train_text_encoder False)")
    g.add_argument("--local_rank", type=int, default=-1, help="set by launchers; the process group comes from the "
                                                             "environment (accelerate launch, msrun)")
    for flag in HUB_FLAGS:
        g.add_argument(flag, default=None, nargs="?", const=True, help=argparse.SUPPRESS)
    for flag in IF_FLAGS:
        g.add_argument(flag, default=None, nargs="*", help=argparse.SUPPRESS)

    g = p.add_argument_group("class images (prior preservation)")
    g.add_argument("--sample_batch_size", type=count, default=4, help="batch size of class-image generation")
    g.add_argument("--sampling_steps", type=count, default=50, help="sampler steps for class and validation images")
    g.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="sampler for class and validation images")
    g.add_argument("--prior_generation_precision", default=None, choices=("no", "fp32", "fp16", "bf16"),
                   help="precision of class-image generation (diffusers' flag); default: --mixed_precision")
    g.add_argument("--scale", type=non_negative, default=9.0, help="classifier-free guidance scale for class and validation images")
    return p


def parse_train_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_train_parser()
    args = parse_with_config(parser, argv)
    return validate_train_args(args)


def validate_train_args(args: argparse.Namespace) -> argparse.Namespace:
    for flag in HUB_FLAGS:
        if getattr(args, flag[2:]) is not None:
            raise UserError(f"{flag} needs the Hugging Face Hub, which this tool never contacts (it works offline on "
                            f"local files): download the model yourself and pass its folder or file to "
                            f"--pretrained_model_name_or_path" + (" (and --tokenizer_path for a vocabulary)"
                                                                  if flag == "--tokenizer_name" else ""))
    for flag in IF_FLAGS:
        if getattr(args, flag[2:]) is not None:
            raise UserError(f"{flag} is for DeepFloyd IF's image-conditioned stages; Stable Diffusion 1.x/2.x has no use for it")
    if args.adam_beta1 is not None:
        args.betas[0] = args.adam_beta1
    if args.adam_beta2 is not None:
        args.betas[1] = args.adam_beta2
    if args.clip_grad is None:
        args.clip_grad = args.max_grad_norm is not None
    if args.max_grad_norm is None:
        args.max_grad_norm = 1.0
    args.resume_if_any = False
    if args.resume_from_checkpoint is not None:
        if args.resume is not None:
            raise UserError("pass --resume or --resume_from_checkpoint, not both")
        args.resume, args.resume_if_any = args.resume_from_checkpoint, True
    if args.center_crop is not None:
        args.random_crop = not args.center_crop
    if args.random_flip is None:
        args.random_flip = args.random_crop
    if not args.instance_data_dir:
        raise UserError("--instance_data_dir is required (the folder with the subject images)")
    if not args.instance_prompt:
        raise UserError("--instance_prompt is required (e.g. 'a photo of sks dog')")
    if args.with_prior_preservation:
        if not args.class_data_dir:
            raise UserError("--class_data_dir is required with --with_prior_preservation True")
        if not args.class_prompt:
            raise UserError("--class_prompt is required with --with_prior_preservation True")
    else:
        args.prior_loss_weight = 0.0
    if args.end_learning_rate is not None and args.end_learning_rate > args.start_learning_rate:
        raise UserError("--end_learning_rate must not exceed --start_learning_rate")
    if args.use_lora:
        if args.lora_ft_text_encoder and not args.train_text_encoder:
            raise UserError("--lora_ft_text_encoder True needs --train_text_encoder True")
        if not (args.lora_ft_unet or args.lora_ft_text_encoder):
            raise UserError("--use_lora True needs --lora_ft_unet True and/or --lora_ft_text_encoder True")
        if args.lora_alpha is None:
            args.lora_alpha = float(args.lora_rank)
    elif args.network_weights:
        raise UserError("--network_weights needs --use_lora True")
    if args.base_weights_multiplier and len(args.base_weights_multiplier) not in (1, len(args.base_weights or ())):
        raise UserError("--base_weights_multiplier takes one value, or one per --base_weights file")
    if args.resume is not None and str(args.resume).lower() in ("true", "latest"):
        args.resume = "latest"
    elif args.resume is not None and str(args.resume).lower() in ("false", "none", ""):
        args.resume = None
    if args.cache_latents and (args.random_crop or args.random_flip):
        raise UserError("--cache_latents needs the same pixels every epoch: center crops and no flips "
                        "(--random_crop False --random_flip False)")
    frozen_text = not args.train_text_encoder or (args.use_lora and not args.lora_ft_text_encoder)
    if args.pre_compute_text_embeddings and not frozen_text:
        raise UserError("--pre_compute_text_embeddings needs a frozen text encoder: --train_text_encoder False "
                        "(or LoRA without --lora_ft_text_encoder)")
    if args.skip_save_text_encoder and args.train_text_encoder and not args.use_lora:
        raise UserError("--skip_save_text_encoder would drop the text encoder this run trains; "
                        "pass --train_text_encoder False")
    if args.scale_lr:
        args.start_learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * world_size()
    args.log_level = str(args.log_level).replace("logging.", "").upper()
    return args


def world_size() -> int:
    """Data-parallel processes of this run, as the launchers (accelerate launch, torchrun, msrun)
    announce them in the environment, before any process group exists."""
    import os
    for key in ("WORLD_SIZE", "MS_WORKER_NUM"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1
