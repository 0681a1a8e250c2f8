"""Training on the PyTorch backend with the tiny models: each mode learns, touches only what it
should, computes the loss it claims to, and resumes exactly."""

import numpy as np
import pytest
import torch

from conftest import SUBJECT, TINY
from common.arch import load_arch
from common.formats.checkpoint_io import load_state_dict
from common.training.data import DreamBoothDataset
from common.training.train_loop import initial_lora
from common.diffusion.schedule import NoiseSchedule
from common.tokenizer import tokenizer_for
from common.training.train_args import parse_train_args
from common.training.train_loop import make_batch, step_inputs



def make_args(tmp_path, *extra):
    return parse_train_args(["--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
                             "--class_data_dir", SUBJECT, "--class_prompt", "a photo of a robot",
                             "--image_size", "64", "--train_batch_size", "2", "--train_data_repeats", "1",
                             "--output_path", str(tmp_path / "run"), "--seed", "7", *extra])


def fixed_data(args, version="v1", micro=0):
    """The first batch of the dataset (center crops) and its step inputs."""
    arch = load_arch(TINY[version])
    tok = tokenizer_for(arch.text)
    prior = args.with_prior_preservation
    ds = DreamBoothDataset(SUBJECT, args.instance_prompt, tok, 64, class_dir=SUBJECT if prior else None,
                           class_prompt=args.class_prompt if prior else None, seed=args.seed)
    data = next(ds.batches(args.train_batch_size, 0))
    randoms = step_inputs(NoiseSchedule(arch.schedule), args, micro, 0, 1, args.train_batch_size, (4, 32, 32),
                          "class_images" in data)
    return data, randoms


def fixed_batch(args, version="v1", micro=0):
    data, randoms = fixed_data(args, version, micro)
    return load_arch(TINY[version]), make_batch(data, randoms, args.prior_loss_weight)


def make_trainer(tmp_path, tiny_models, version="v1", *extra):
    from backends.cuda import Trainer
    args = make_args(tmp_path, "--model_config", TINY[version], *extra)
    arch = load_arch(TINY[version])
    lora = initial_lora(args, arch) if args.use_lora else None
    return Trainer(arch, load_state_dict(tiny_models[version]), args, lora), args


@pytest.mark.parametrize("mode,lr,target", [((), 1e-3, 0.5), (("--use_lora", "True", "--lora_rank", "8"), 1e-2, 0.8)])
def test_overfitting_one_batch_lowers_the_loss(tmp_path, tiny_models, mode, lr, target):
    trainer, args = make_trainer(tmp_path, tiny_models, "v2", "--train_text_encoder", "False",
                                 "--with_prior_preservation", "False", *mode)
    _, batch = fixed_batch(args, "v2")
    losses = [float(trainer.train_step(batch, lr, True)["loss"]) for _ in range(50)]
    assert max(losses[-3:]) < target * losses[0], losses


def test_prior_preservation_loss_is_instance_plus_weighted_class(tmp_path, tiny_models):
    """The concatenated step equals the hand computation: separate MSEs of the two halves."""
    trainer, args = make_trainer(tmp_path, tiny_models, "v1", "--prior_loss_weight", "0.7", "--train_text_encoder", "False")
    arch, batch = fixed_batch(args)
    with torch.no_grad():
        loss, inst, prior = trainer.compute_loss(batch)
        unet, vae, text = trainer._unet, trainer.vae, trainer._text
        per = []
        for i in range(len(batch["images"])):
            img = torch.from_numpy(batch["images"][i:i + 1])
            post = vae.encode(img).latent_dist
            z = (post.mean + post.std * torch.from_numpy(batch["latent_noise"][i:i + 1])) * arch.scale_factor
            noise = torch.from_numpy(batch["noise"][i:i + 1])
            a, b = float(batch["coef_a"][i]), float(batch["coef_b"][i])
            ctx = text(torch.from_numpy(batch["ids"][i:i + 1]))[0]
            pred = unet(a * z + b * noise, torch.tensor([int(batch["timesteps"][i])]), encoder_hidden_states=ctx).sample
            per.append(float(((pred - noise) ** 2).mean()))
    n = batch["n_instance"]
    expected_inst, expected_prior = np.mean(per[:n]), np.mean(per[n:])
    assert float(inst) == pytest.approx(expected_inst, rel=1e-5)
    assert float(prior) == pytest.approx(expected_prior, rel=1e-5)
    assert float(loss) == pytest.approx(expected_inst + 0.7 * expected_prior, rel=1e-5)


def test_min_snr_weights_each_half_by_its_own_timesteps(tmp_path, tiny_models):
    trainer, args = make_trainer(tmp_path, tiny_models, "v1", "--snr_gamma", "5", "--train_text_encoder", "False")
    arch, batch = fixed_batch(args)
    sched = NoiseSchedule(arch.schedule)
    w = sched.min_snr_weights(batch["timesteps"], 5.0)
    assert batch["loss_weights"].shape == (4,) and np.allclose(batch["loss_weights"], w)
    plain = dict(batch, loss_weights=np.ones(4, np.float32))
    with torch.no_grad():
        _, inst_w, prior_w = trainer.compute_loss(batch)
        # recover per-sample losses from single-sample batches
        per = [float(trainer.compute_loss(dict(plain, images=plain["images"][i:i + 1], ids=plain["ids"][i:i + 1],
                                                  latent_noise=plain["latent_noise"][i:i + 1], noise=plain["noise"][i:i + 1],
                                                  timesteps=plain["timesteps"][i:i + 1], coef_a=plain["coef_a"][i:i + 1],
                                                  coef_b=plain["coef_b"][i:i + 1], loss_weights=plain["loss_weights"][i:i + 1],
                                                  n_instance=1))[0]) for i in range(4)]
    assert float(inst_w) == pytest.approx(np.mean(np.array(per[:2]) * w[:2]), rel=1e-4)
    assert float(prior_w) == pytest.approx(np.mean(np.array(per[2:]) * w[2:]), rel=1e-4)


def _snapshot(trainer):
    return {**{"unet." + k: v.detach().clone() for k, v in trainer._unet.state_dict().items()},
            **{"text." + k: v.detach().clone() for k, v in trainer._text.state_dict().items()}}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("layers", ["attention", "kohya", "all"])
def test_lora_training_changes_only_lora_parameters(tmp_path, tiny_models, layers):
    trainer, args = make_trainer(tmp_path, tiny_models, "v1", "--use_lora", "True", "--lora_ft_text_encoder", "True",
                                 "--with_prior_preservation", "False", "--lora_layers", layers)
    _, batch = fixed_batch(args)
    before = _snapshot(trainer)
    for _ in range(2):
        trainer.train_step(batch, 1e-3, True)
    changed = _changed(before, _snapshot(trainer))
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any(k.startswith("text.") for k in changed) and any(k.startswith("unet.") for k in changed)
    lora = trainer.export_lora()
    assert set(lora) == set(initial_lora(args, load_arch(TINY["v1"])))
    assert all(np.abs(p.up).max() > 0 for p in lora.values())          # every target trains
    leaves = {t.rsplit(".", 1)[-1] for t in lora}
    assert ("fc1" in leaves) == (layers != "attention") and ("conv1" in leaves) == (layers == "all")


def test_lora_dropout_reaches_the_adapters(tmp_path, tiny_models):
    trainer, args = make_trainer(tmp_path, tiny_models, "v1", "--use_lora", "True", "--lora_dropout", "0.5",
                                 "--with_prior_preservation", "False")
    layer = trainer.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.lora_dropout["default"].p == 0.5


@pytest.mark.parametrize("train_text", [False, True])
def test_text_encoder_changes_only_when_asked(tmp_path, tiny_models, train_text):
    trainer, args = make_trainer(tmp_path, tiny_models, "v1", "--train_text_encoder", str(train_text),
                                 "--with_prior_preservation", "False")
    _, batch = fixed_batch(args)
    before = _snapshot(trainer)
    trainer.train_step(batch, 1e-3, True)
    changed = _changed(before, _snapshot(trainer))
    assert any(k.startswith("unet.") for k in changed)
    assert any(k.startswith("text.") for k in changed) == train_text
    assert not any(k.startswith("vae") for k in changed)
    exported = trainer.export_weights()
    base = load_state_dict(tiny_models["v1"])
    te = [k for k in base if k.startswith("cond_stage_model.")]
    same = all(np.array_equal(exported[k], base[k]) for k in te)
    assert same != train_text
    assert all(np.array_equal(exported[k], base[k]) for k in base if k.startswith("first_stage_model."))


def test_gradient_accumulation_matches_the_big_batch(tmp_path, tiny_models):
    """Two micro-batches of 1 with accumulation 2 == one batch of 2 (same samples, same noise)."""
    # a large Adam epsilon makes the update linear in the gradient, so float noise is not amplified
    common = ("--with_prior_preservation", "False", "--train_text_encoder", "False", "--adam_epsilon", "1")
    big, args = make_trainer(tmp_path, tiny_models, "v1", *common)
    _, batch = fixed_batch(args)
    small, _ = make_trainer(tmp_path, tiny_models, "v1", *common, "--gradient_accumulation_steps", "2")
    w0 = {k: v.clone() for k, v in big._unet.state_dict().items()}
    big.train_step(batch, 1e-3, True)
    for i in range(2):
        half = {k: (v[i:i + 1] if isinstance(v, np.ndarray) and v.ndim and len(v) == 2 else v) for k, v in batch.items()}
        half["n_instance"] = 1
        small.train_step(half, 1e-3, i == 1)
    a, b = big._unet.state_dict(), small._unet.state_dict()
    update = max(float((a[k] - w0[k]).abs().max()) for k in a)
    assert update > 0
    # equal up to float rounding: a relative 1e-4 of the update, plus a couple of ulps of the weight
    assert all(((a[k] - b[k]).abs() <= 1e-4 * update + 2 * a[k].abs() * 2.0 ** -23).all() for k in a)


def test_gradient_checkpointing_gives_the_same_step(tmp_path, tiny_models):
    common = ("--with_prior_preservation", "False", "--train_text_encoder", "True", "--adam_epsilon", "1")
    plain, args = make_trainer(tmp_path, tiny_models, "v2", *common)
    ckpt, _ = make_trainer(tmp_path, tiny_models, "v2", *common, "--gradient_checkpointing", "True")
    _, batch = fixed_batch(args, "v2")
    la = float(plain.train_step(batch, 1e-3, True)["loss"])
    lb = float(ckpt.train_step(batch, 1e-3, True)["loss"])
    assert la == pytest.approx(lb, rel=1e-6)
    a, b = plain._unet.state_dict(), ckpt._unet.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-7


def test_ema_checkpoint_holds_the_ema_weights(tmp_path, tiny_models):
    trainer, args = make_trainer(tmp_path, tiny_models, "v1", "--with_prior_preservation", "False",
                                 "--train_text_encoder", "False", "--use_ema", "True", "--ema_decay", "0.9")
    _, batch = fixed_batch(args)
    w0 = {k: p.detach().clone() for k, p in trainer.trainable.items()}
    trainer.train_step(batch, 1e-3, True)
    d = 0.9 * (1 - np.exp(-1 / 2000))
    key = next(k for k in trainer.trainable if k.endswith("conv_in.weight"))
    expected = d * w0[key] + (1 - d) * trainer.trainable[key].detach()
    assert torch.allclose(trainer.ema[key], expected, atol=1e-7)
    exported = trainer.export_weights()
    assert np.allclose(exported["model.diffusion_model.input_blocks.0.0.weight"], expected.numpy(), atol=1e-7)
    # the live weights are back after exporting
    assert not torch.allclose(trainer.trainable[key].detach(), expected)


def test_offset_noise_is_constant_per_sample_and_channel(tmp_path):
    args = make_args(tmp_path, "--with_prior_preservation", "False", "--offset_noise", "0.1")
    plain = make_args(tmp_path, "--with_prior_preservation", "False")
    sched = NoiseSchedule(load_arch(TINY["v1"]).schedule)
    a = step_inputs(sched, args, 3, 0, 1, 2, (4, 8, 8), False)["noise"]
    b = step_inputs(sched, plain, 3, 0, 1, 2, (4, 8, 8), False)["noise"]
    offset = a - b
    assert np.allclose(offset, offset[:, :, :1, :1], atol=1e-6) and np.abs(offset).max() > 1e-3


def test_learning_rate_schedule(tmp_path):
    """MindONE's keys (the default schedule) and diffusers' --lr_scheduler through the same flags."""
    from common.training.train_loop import lr_schedule
    args = make_args(tmp_path, "--start_learning_rate", "1e-4", "--warmup_steps", "4", "--end_learning_rate", "0",
                     "--decay_steps", "10", "--with_prior_preservation", "False")
    learning_rate = lr_schedule(args, 100)
    assert [learning_rate(s) for s in (0, 3)] == pytest.approx([2.5e-5, 1e-4])
    assert learning_rate(9) == pytest.approx(0.5e-4)
    assert learning_rate(100) == pytest.approx(0.0)
    constant = lr_schedule(make_args(tmp_path, "--start_learning_rate", "2e-6", "--with_prior_preservation", "False"), 9)
    assert constant(0) == constant(500) == pytest.approx(2e-6)
    restarts = lr_schedule(make_args(tmp_path, "--learning_rate", "1e-4", "--lr_scheduler", "cosine_with_restarts",
                                     "--lr_num_cycles", "2", "--lr_warmup_steps", "0",
                                     "--with_prior_preservation", "False"), 20)
    assert restarts(0) == restarts(10) == pytest.approx(1e-4) and restarts(5) == pytest.approx(0.5e-4)
    piecewise = lr_schedule(make_args(tmp_path, "--learning_rate", "1e-4", "--lr_scheduler", "piecewise_constant",
                                      "--lr_step_rules", "1:3,0.1:5,0.01", "--with_prior_preservation", "False"), 9)
    assert [piecewise(s) for s in (2, 3, 4, 5)] == pytest.approx([1e-4, 1e-5, 1e-5, 1e-6])


def test_network_weights_start_the_adapters_and_base_weights_merge(tmp_path, tiny_models):
    """kohya's --network_weights (continue a LoRA) and --base_weights (merge LoRAs first)."""
    from common.errors import UserError
    from common.formats import lora as lora_fmt
    from common.formats.checkpoint_io import save_state_dict
    from common.training.train_loop import load_base_weights
    arch = load_arch(TINY["v1"])
    start = lora_fmt.init_lora(arch, 4, 2.0, 1, unet=True, text_encoder=True, layers="kohya")
    rng = np.random.default_rng(0)
    for pair in start.values():
        pair.up = rng.standard_normal(pair.up.shape).astype(np.float32)
    path = str(tmp_path / "start.safetensors")
    save_state_dict(path, lora_fmt.to_kohya(start))
    common = ("--use_lora", "True", "--lora_ft_text_encoder", "True", "--model_config", TINY["v1"],
              "--pretrained_model_path", tiny_models["v1"])
    args = make_args(tmp_path, *common, "--lora_alpha", "2", "--lora_layers", "all", "--network_weights", path)
    init = initial_lora(args, arch)
    assert set(start) < set(init)
    for t, pair in init.items():
        if t in start:
            np.testing.assert_array_equal(pair.up.reshape(start[t].up.shape), start[t].up)
        else:
            assert not pair.up.any()
    with pytest.raises(UserError, match="--lora_rank 4 --lora_alpha 2"):
        initial_lora(make_args(tmp_path, *common, "--lora_rank", "8", "--lora_layers", "all",
                               "--network_weights", path), arch)
    with pytest.raises(UserError, match="outside the trained set"):
        initial_lora(make_args(tmp_path, *common, "--lora_alpha", "2", "--network_weights", path), arch)
    merged = load_base_weights(make_args(tmp_path, *common, "--base_weights", path, "--base_weights_multiplier",
                                         "0.5"), arch)
    want = lora_fmt.merge_loras(load_state_dict(tiny_models["v1"]), arch, [(start, 0.5)])
    assert all(np.array_equal(merged[k], want[k]) for k in want)


def test_accelerate_config_does_not_change_our_precision(tmp_path, tiny_models, monkeypatch, caplog):
    """`accelerate launch` exports the user's config (ACCELERATE_MIXED_PRECISION=bf16): the trainer
    states mixed precision and accumulation itself, warns once, and computes the same loss."""
    from accelerate.state import AcceleratorState

    trainer, args = make_trainer(tmp_path, tiny_models, "v1", "--with_prior_preservation", "False")
    _, batch = fixed_batch(args)
    want = trainer.compute_loss(batch)[0].item()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)
    trainer, _ = make_trainer(tmp_path, tiny_models, "v1", "--with_prior_preservation", "False")
    assert trainer.accelerator.mixed_precision == "no" and trainer.accelerator.gradient_accumulation_steps == 1
    assert "accelerate config asks for mixed precision bf16" in caplog.text
    assert trainer.compute_loss(batch)[0].item() == want
