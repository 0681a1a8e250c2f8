"""The two scripts as users run them: each training mode end to end, and bad input as one line."""
import os
import pickle

import numpy as np

from conftest import SUBJECT, TINY
from helpers.scripts import run_script
from common.formats.checkpoint_io import load_state_dict


def run(*args, check=True):
    return run_script(*args, check=check)


def train(out, model, config, *extra, check=True):
    return run("train_dreambooth.py", "--model_config", config, "--pretrained_model_path", model,
               "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
               "--image_size", "64", "--train_batch_size", "1", "--train_data_repeats", "1",
               "--max_train_steps", "2", "--output_path", str(out), "--sampling_steps", "2",
               "--start_learning_rate", "1e-4", *extra, check=check)


def sample(out, model, config, *extra, check=True):
    return run("text_to_image.py", "--config", config, "--ckpt_path", model, "--prompt", "a photo of sks robot",
               "--n_samples", "2", "--n_iter", "1", "--sampling_steps", "2", "--output_path", str(out), *extra,
               check=check)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_vanilla_then_sample(tmp_path, tiny_models):
    out = tmp_path / "vanilla"
    train(out, tiny_models["v1"], TINY["v1"], "--train_config", "configs/train/train_config_dreambooth_vanilla_v1.yaml",
          "--ckpt_save_steps", "1", "--ckpt_max_keep", "1", "--save_format", "ckpt")
    ckpts = sorted(os.listdir(out / "ckpt"))
    assert "sd-2.ckpt" in ckpts and "sd-1.ckpt" not in ckpts      # keep-last-1
    assert not any(name.endswith(".tmp") for name in ckpts)
    rows = (out / "loss.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,epoch,loss")
    proc = sample(tmp_path / "t2i", str(out / "ckpt" / "sd-2.ckpt"), TINY["v1"], "--sampler", "ddim")
    assert (tmp_path / "t2i" / "samples" / "00001.png").exists() and (tmp_path / "t2i" / "grid-0000.png").exists()
    assert "samples:" in proc.stdout
    # a second run continues the numbering instead of overwriting
    sample(tmp_path / "t2i", str(out / "ckpt" / "sd-2.ckpt"), TINY["v1"], "--ddim")
    assert (tmp_path / "t2i" / "samples" / "00003.png").exists() and (tmp_path / "t2i" / "grid-0001.png").exists()


def test_dreambooth_generates_class_images_then_samples(tmp_path, tiny_models):
    out, cls = tmp_path / "db", tmp_path / "class"
    train(out, tiny_models["v2"], TINY["v2"], "--train_config", "configs/train/train_config_dreambooth_v2.yaml",
          "--class_data_dir", str(cls), "--class_prompt", "a photo of a robot", "--num_class_images", "3",
          "--sample_batch_size", "2", "--validation_prompts", "a sks robot", "--validation_steps", "2")
    assert sorted(os.listdir(cls)) == ["00000.png", "00001.png", "00002.png"]
    assert (out / "validation" / "step-2.png").exists()
    weights = load_state_dict(str(out / "ckpt" / "sd-2.safetensors"))
    assert any(k.startswith("cond_stage_model.model.") for k in weights)
    sample(tmp_path / "t2i", str(out / "ckpt" / "sd-2.safetensors"), TINY["v2"], "--sampler", "unipc")
    assert len(os.listdir(tmp_path / "t2i" / "samples")) == 2


def test_lora_then_sample_with_lora(tmp_path, tiny_models):
    """LoCon on every layer: kohya's metadata, diffusers loads the file, stacked files add up."""
    from common.arch import load_arch
    from common.formats import lora as lora_fmt, loading
    from common.formats.checkpoint_io import safetensors_metadata
    out = tmp_path / "lora"
    train(out, tiny_models["v1"], TINY["v1"], "--train_config", "configs/train/train_config_dreambooth_lora_v1.yaml",
          "--with_prior_preservation", "False", "--lora_rank", "4", "--lora_layers", "all")
    folder = out / "ckpt" / "lora-2"
    meta = safetensors_metadata(str(folder / "lora_kohya.safetensors"))
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "4" and "conv_dim" in meta["ss_network_args"] and meta["ss_v2"] == "False"
    assert not (folder / lora_fmt.MINDSPORE_WEIGHT_NAME).exists()        # MindONE's format: attention only
    arch = load_arch(TINY["v1"])
    weights = load_state_dict(tiny_models["v1"])
    ours = lora_fmt.merge_loras(weights, arch, [(loading.load_lora_file(str(folder), arch), 1.0)])
    from test_lora_files import diffusers_pipeline, ours_as_diffusers, torch_state
    pipe = diffusers_pipeline(arch, weights)
    pipe.load_lora_weights(str(folder), weight_name=lora_fmt.KOHYA_WEIGHT_NAME)
    pipe.fuse_lora(lora_scale=1.0)
    theirs, mine = torch_state(pipe.unet, pipe.text_encoder), ours_as_diffusers(ours, arch)
    assert max(float(np.abs(theirs[k] - mine[k]).max()) for k in mine) < 1e-6
    kohya = load_state_dict(str(folder / "lora_kohya.safetensors"))
    diffusers = load_state_dict(str(folder / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    assert all(k.startswith(("unet.", "text_encoder.")) and "lora" in k for k in diffusers)
    assert not any(k.startswith("model.") for k in kohya)       # LoRA checkpoints hold only LoRA tensors
    base = sample(tmp_path / "base", tiny_models["v1"], TINY["v1"], "--sampler", "euler")
    with_lora = sample(tmp_path / "withlora", tiny_models["v1"], TINY["v1"], "--sampler", "euler", "--use_lora", "True",
                       "--lora_ckpt_path", str(folder), "--lora_scale", "50")
    stacked = sample(tmp_path / "stacked", tiny_models["v1"], TINY["v1"], "--sampler", "euler", "--use_lora", "True",
                     "--lora_ckpt_path", str(folder), str(folder / "lora_kohya.safetensors"), "--lora_scale", "20", "30")
    from PIL import Image
    a, b, c = (np.asarray(Image.open(tmp_path / d / "samples" / "00000.png"), np.float32)
               for d in ("base", "withlora", "stacked"))
    assert np.abs(a - b).mean() > 0.5, "the LoRA changed nothing"
    assert np.abs(b - c).mean() < 0.05, "two files at 20 and 30 are one at 50"
    assert base.returncode == with_lora.returncode == stacked.returncode == 0
    bad = sample(tmp_path / "bad", tiny_models["v1"], TINY["v1"], "--use_lora", "True", "--lora_ckpt_path",
                 str(folder), str(folder), "--lora_scale", "1", "2", "3", check=False)
    assert_one_line_error(bad, "one per --lora_ckpt_path")


# ----------------------------------------------------------------------------- bad input

def test_missing_and_empty_instance_folder(tmp_path, tiny_models):
    proc = run("train_dreambooth.py", "--instance_data_dir", str(tmp_path / "nope"), "--instance_prompt", "x",
               "--with_prior_preservation", "False", "--model_config", TINY["v1"],
               "--pretrained_model_path", tiny_models["v1"], "--output_path", str(tmp_path / "o"), check=False)
    assert_one_line_error(proc, "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    (empty / "broken.png").write_bytes(b"not a png")
    proc = run("train_dreambooth.py", "--instance_data_dir", str(empty), "--instance_prompt", "x",
               "--with_prior_preservation", "False", "--model_config", TINY["v1"],
               "--pretrained_model_path", tiny_models["v1"], "--output_path", str(tmp_path / "o"), check=False)
    assert_one_line_error(proc, "no readable images")


def test_bad_checkpoints_are_one_line_errors(tmp_path, tiny_models):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(tiny_models["v1"], "rb").read()[:5000])
    assert_one_line_error(sample(tmp_path / "o", str(truncated), TINY["v1"], check=False), "truncated.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    assert_one_line_error(sample(tmp_path / "o", str(evil), TINY["v1"], check=False))
    assert not (tmp_path / "pwned").exists()

    # a v2 checkpoint with the v1 config: the mismatch is named, not a shape traceback
    assert_one_line_error(sample(tmp_path / "o", tiny_models["v2"], TINY["v1"], check=False))
    assert_one_line_error(sample(tmp_path / "o", str(tmp_path / "missing.safetensors"), TINY["v1"], check=False),
                          "missing.safetensors")


def test_existing_run_is_not_overwritten_and_resume_needs_a_state(tmp_path, tiny_models):
    out = tmp_path / "run"
    args = ("--with_prior_preservation", "False")
    train(out, tiny_models["v1"], TINY["v1"], *args)
    before = (out / "ckpt" / "sd-2.safetensors").read_bytes()
    assert_one_line_error(train(out, tiny_models["v1"], TINY["v1"], *args, check=False), "--resume")
    assert (out / "ckpt" / "sd-2.safetensors").read_bytes() == before
    assert_one_line_error(train(tmp_path / "fresh", tiny_models["v1"], TINY["v1"], *args, "--resume", check=False),
                          "nothing to resume")


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_models):
    out = tmp_path / "nan"
    proc = train(out, tiny_models["v1"], TINY["v1"], "--with_prior_preservation", "False", "--start_learning_rate", "1e30",
                 "--max_train_steps", "6", "--ckpt_save_steps", "1", check=False)
    assert_one_line_error(proc, "loss became")
    for name in os.listdir(out / "ckpt"):
        assert not name.endswith(".tmp")
        if name.endswith(".safetensors"):
            load_state_dict(str(out / "ckpt" / name))   # every file left behind is complete


def test_help_explains_every_flag():
    for script in ("train_dreambooth.py", "text_to_image.py", "tools/make_tiny_model.py"):
        out = run(script, "--help").stdout
        assert "usage:" in out
    train_help = run("train_dreambooth.py", "--help").stdout
    for flag in ("--train_config", "--model_config", "--backend", "--pretrained_model_path", "--instance_data_dir",
                 "--instance_prompt", "--class_data_dir", "--class_prompt", "--with_prior_preservation",
                 "--prior_loss_weight", "--num_class_images", "--train_text_encoder", "--use_lora", "--lora_rank",
                 "--image_size", "--train_batch_size", "--epochs", "--max_train_steps", "--start_learning_rate",
                 "--seed", "--output_path", "--resume"):
        assert flag in train_help, flag
