"""diffusers' DreamBooth README commands, unchanged but for sizes, through our CLI; the savers
they use (8-bit Adam, cached latents, pre-computed text embeddings) and TensorBoard logs."""
from __future__ import annotations

import math

import numpy as np
import pytest

import pathlib

from conftest import SUBJECT, TINY
from test_cli import run

pytest.importorskip("torch")


def diffusers_command(model, out, class_dir, *extra):
    """examples/dreambooth/README.md's commands, with `--flag=value` spelling as there. A diffusers
    folder needs no architecture yaml; a single file is given the tiny one."""
    config = () if pathlib.Path(model).is_dir() else (f"--model_config={TINY['v1']}",)
    model = pathlib.Path(model)
    return ("train_dreambooth.py", *config, f"--pretrained_model_name_or_path={model}",
            f"--instance_data_dir={SUBJECT}", f"--output_dir={out}", "--instance_prompt=a photo of sks robot",
            "--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=5e-6",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2", "--seed=0",
            f"--class_data_dir={class_dir}", "--class_prompt=a photo of robot", "--num_class_images=2",
            "--sample_batch_size=2", "--sampling_steps=2", *extra)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_models):
    """The tiny SD1 model as a diffusers folder (what --pretrained_model_name_or_path usually is)."""
    from common.arch import load_arch
    from common.formats import keymap
    from common.formats.checkpoint_io import load_state_dict, save_diffusers_folder
    arch = load_arch(TINY["v1"])
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-sd1"
    save_diffusers_folder(str(folder), keymap.ldm_to_diffusers(load_state_dict(tiny_models["v1"]), arch), arch)
    return folder


def test_the_full_readme_command_with_every_saver_and_tensorboard(tmp_path, tiny_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    proc = run(*diffusers_command(tiny_folder, out, tmp_path / "class", "--with_prior_preservation",
                                  "--prior_loss_weight=1.0", "--train_text_encoder", "--use_8bit_adam",
                                  "--gradient_checkpointing", "--mixed_precision=fp16",
                                  "--enable_xformers_memory_efficient_attention", "--set_grads_to_none",
                                  "--report_to=tensorboard", "--validation_prompt=a sks robot on the beach",
                                  "--num_validation_images=2", "--validation_steps=2",
                                  "--validation_scheduler=DPMSolverMultistepScheduler", "--checkpointing_steps=1",
                                  "--checkpoints_total_limit=1", "--allow_tf32", "--dataloader_num_workers=2",
                                  "--adam_beta1=0.8", "--adam_beta2=0.99", "--max_grad_norm=1.0", "--offset_noise"))
    assert (out / "ckpt" / "sd-2.safetensors").exists() and len(list((tmp_path / "class").iterdir())) == 2
    assert "Traceback" not in proc.stderr
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([5e-6, 5e-6])
    assert events.Scalars("train/grad_norm")[0].value > 0                 # --max_grad_norm turns clipping on
    image = events.Images("validation")[0]
    assert image.step == 2 and (image.width, image.height) == (2 * 64, 64)  # 2 images of 1 prompt
    config = (out / "train_config.yaml").read_text()
    assert "- 0.8\n- 0.99" in config and "offset_noise: 0.1" in config and "use_8bit_adam: true" in config


def test_the_lora_readme_command_and_resume_from_checkpoint_latest(tmp_path, tiny_models):
    out = tmp_path / "lora"
    lora = ("--use_lora", "--rank=4", "--learning_rate=1e-4", "--report_to=none", "--lr_scheduler=cosine",
            "--lr_warmup_steps=1", "--image_interpolation_mode=lanczos", "--resume_from_checkpoint=latest")
    run(*diffusers_command(tiny_models["v1"], out, SUBJECT, "--with_prior_preservation=False", *lora))
    assert (out / "ckpt" / "lora-2" / "pytorch_lora_weights.safetensors").exists()
    lrs = [float(r.split(",")[5]) for r in (out / "loss.csv").read_text().strip().splitlines()[1:]]
    # diffusers' cosine with warmup 1 over 2 steps: 0 at the first update, then the half cosine
    assert lrs == pytest.approx([0.0, 1e-4 * 0.5 * (1 + math.cos(math.pi * 0.5 * 0))])
    proc = run(*diffusers_command(tiny_models["v1"], out, SUBJECT, "--with_prior_preservation=False", *lora,
                                  "--max_train_steps=3"))
    assert "resumed at step 2" in proc.stderr and (out / "ckpt" / "lora-3").exists()


@pytest.mark.parametrize("flag,needle", [("--push_to_hub", "Hugging Face Hub"), ("--hub_token=x", "Hugging Face Hub"),
                                         ("--variant=fp16", "Hugging Face Hub"),
                                         ("--class_labels_conditioning=timesteps", "DeepFloyd IF"),
                                         ("--validation_scheduler=LMSDiscreteScheduler", "DDPMScheduler"),
                                         ("--cache_latents --random_flip", "--cache_latents needs the same pixels"),
                                         ("--pre_compute_text_embeddings --train_text_encoder", "frozen text encoder"),
                                         ("--tokenizer_max_length=100", "between 2 and the text encoder's")])
def test_what_cannot_be_honoured_is_one_line(tmp_path, tiny_models, flag, needle):
    """Parsed in-process (the CLI turns a UserError into one 'error:' line, see test_cli)."""
    from common.errors import UserError
    from common.tokenizer import tokenizer_for
    from common.arch import load_arch
    from common.training.train_args import parse_train_args
    argv = list(diffusers_command(tiny_models["v1"], tmp_path / "o", SUBJECT, *flag.split()))[1:]
    with pytest.raises(UserError, match=needle):
        args = parse_train_args(argv)
        tokenizer_for(load_arch(TINY["v1"]).text, None, args.tokenizer_max_length)


def test_savers_and_the_text_mask_give_the_same_loss_on_both_backends(tmp_path, tiny_models):
    """The same batch with and without cached latents / pre-computed text embeddings gives the same
    loss (the posterior is still sampled with the step's noise), on each backend, and diffusers'
    --text_encoder_use_attention_mask is the same on both (and matters: the loss moves)."""
    ms = pytest.importorskip("mindspore")
    import backends.ascend as ascend
    import backends.cuda as cuda
    from common.arch import load_arch
    from common.formats.checkpoint_io import load_state_dict
    from common.training.train_args import parse_train_args
    from common.training.train_loop import EncodedInputs, make_batch
    from test_train_cuda import fixed_data

    ms.set_context(mode=ms.GRAPH_MODE)
    arch = load_arch(TINY["v1"])
    weights = load_state_dict(tiny_models["v1"])
    argv = ["--model_config", TINY["v1"], "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
            "--class_data_dir", SUBJECT, "--class_prompt", "a photo of a robot", "--image_size", "64",
            "--train_batch_size", "2", "--train_text_encoder", "False", "--output_path", str(tmp_path), "--seed", "7"]
    mask, latents, texts = "--text_encoder_use_attention_mask", "--cache_latents", "--pre_compute_text_embeddings"
    runs = {"cuda": (cuda, ()), "cuda+mask": (cuda, (mask,)), "cuda+mask+savers": (cuda, (mask, latents, texts)),
            "ascend+mask+savers": (ascend, (mask, latents, texts))}
    data, randoms = fixed_data(parse_train_args(argv), "v1")
    losses = {}
    for name, (backend, flags) in runs.items():
        args = parse_train_args(argv + list(flags))
        trainer = backend.Trainer(arch, weights, args)
        encoded = EncodedInputs(trainer, args.cache_latents, args.pre_compute_text_embeddings)
        batch = make_batch(data, randoms, 1.0, encoded)
        assert ("images" in batch) != args.cache_latents and ("ids" in batch) != args.pre_compute_text_embeddings
        losses[name] = [float(trainer.train_step(batch, 1e-3, True)["loss"]) for _ in range(2)]
        if args.cache_latents:
            assert len(encoded.latents) == len(set(data["instance_paths"] + data["class_paths"]))
        if args.pre_compute_text_embeddings:
            assert len(encoded.contexts) == 2                                 # the two prompts, once each
    assert np.isfinite(losses["cuda"]).all()
    assert abs(losses["cuda+mask"][0] - losses["cuda"][0]) > 1e-5 * losses["cuda"][0]
    assert losses["cuda+mask+savers"] == pytest.approx(losses["cuda+mask"], rel=1e-6)
    assert losses["ascend+mask+savers"] == pytest.approx(losses["cuda+mask"], rel=1e-4)
