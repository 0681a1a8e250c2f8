"""MindONE's three DreamBooth configs through the CLI with --backend ascend (train, resume, sample),
and msrun's flag without msrun. A module of its own, independent of test_train_ascend's compiled
Trainers, so the two modules can run in parallel processes."""
from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("mindspore")

from conftest import SUBJECT, TINY  # noqa: E402
from helpers.scripts import run_script  # noqa: E402
from common.formats import lora as lora_fmt  # noqa: E402
from common.formats.checkpoint_io import load_state_dict  # noqa: E402
from common.formats.lora import MINDSPORE_WEIGHT_NAME as MINDSPORE_LORA_NAME  # noqa: E402

SIZE = 16


run = run_script


@pytest.mark.parametrize("config", ["dreambooth", "dreambooth_vanilla", "dreambooth_lora"])
def test_mindone_commands_train_resume_and_sample(tmp_path, tiny_models, config):
    """MindONE's three DreamBooth configs with --backend ascend: train, save, resume, sample. They run
    in PYNATIVE_MODE (--mode 1 / --ms_mode 1), which needs no compilation per process; the compiled
    path through the CLI is the msrun test's."""
    out, cls = tmp_path / "run", tmp_path / "class"
    cls.mkdir()
    for name in sorted(n for n in os.listdir(SUBJECT) if n.endswith(".png"))[:2]:
        shutil.copy(os.path.join(SUBJECT, name), cls / name)     # class images present: none to generate
    lora = config.endswith("lora")
    common = ["train_dreambooth.py", "--train_config", f"configs/train/train_config_{config}_v2.yaml",
              "--backend", "ascend", "--model_config", TINY["v2"], "--pretrained_model_path", tiny_models["v2"],
              "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
              "--class_data_dir", str(cls), "--class_prompt", "a photo of a robot", "--num_class_images", "2",
              "--image_size", str(SIZE), "--train_data_repeats", "1", "--ckpt_save_steps", "1",
              "--output_path", str(out), "--lora_rank", "4", "--mode", "1"]
    if config == "dreambooth":
        common += ["--save_format", "mindspore"]
    assert "class images" not in run(*common, "--max_train_steps", "1").stderr
    proc = run(*common, "--max_train_steps", "2", "--resume")
    assert "resumed at step 1" in proc.stderr
    assert [r.split(",")[0] for r in (out / "loss.csv").read_text().splitlines()] == ["step", "1", "2"]
    name = "lora-2" if lora else "sd-2.ckpt" if config == "dreambooth" else "sd-2.safetensors"
    ckpt = out / "ckpt" / name
    assert ckpt.exists()
    if lora:
        assert sorted(os.listdir(ckpt)) == sorted([lora_fmt.DIFFUSERS_WEIGHT_NAME, lora_fmt.KOHYA_WEIGHT_NAME,
                                                   MINDSPORE_LORA_NAME])
        extra = ["--ckpt_path", tiny_models["v2"], "--use_lora", "True", "--lora_ckpt_path", str(ckpt),
                 "--lora_ft_text_encoder", "True"]
    else:
        if config == "dreambooth":                   # MindONE's layout, MindSpore's file format
            from common.formats.checkpoint_io import sniff_format
            assert sniff_format(str(ckpt)) == "mindspore"
            assert any(k.startswith("cond_stage_model.transformer.") for k in load_state_dict(str(ckpt)))
        extra = ["--ckpt_path", str(ckpt)]
    run("text_to_image.py", "--backend", "ascend", "--config", TINY["v2"], "--prompt", "a photo of sks robot",
        "--n_samples", "1", "--n_iter", "1", "--sampling_steps", "2", "--H", str(SIZE), "--W", str(SIZE),
        "--output_path", str(tmp_path / "t2i"), "--ms_mode", "1", *extra)
    assert (tmp_path / "t2i" / "samples" / "00000.png").exists()


def test_use_parallel_without_msrun_is_one_line(tmp_path, tiny_models):
    proc = run("train_dreambooth.py", "--backend", "ascend", "--use_parallel", "True", "--model_config", TINY["v2"],
               "--pretrained_model_path", tiny_models["v2"], "--instance_data_dir", SUBJECT,
               "--instance_prompt", "a photo of sks robot", "--with_prior_preservation", "False",
               "--output_path", str(tmp_path / "run"), check=False, fresh=True)   # a failed communication init stays
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "msrun" in lines[0]
