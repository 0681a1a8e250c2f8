"""An interrupted run resumes to exactly the weights of an uninterrupted one, and data-parallel
training with accelerate (2 CPU processes) equals one process with the same global batch."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SUBJECT, TINY, free_port
from helpers.scripts import run_script
from common.formats.checkpoint_io import load_state_dict
from common.training.train_args import parse_train_args


def args_for(out, model, *extra):
    return parse_train_args(["--model_config", TINY["v1"], "--pretrained_model_path", model,
                             "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
                             "--class_data_dir", SUBJECT, "--class_prompt", "a photo of a robot",
                             "--num_class_images", "1", "--image_size", "64", "--train_batch_size", "1",
                             "--train_data_repeats", "1", "--ckpt_save_steps", "2", "--output_path", str(out),
                             "--start_learning_rate", "1e-3", "--seed", "11", *extra])


@pytest.mark.parametrize("mode", [(), ("--use_lora", "True", "--lora_ft_text_encoder", "True"),
                                  ("--use_ema", "True", "--gradient_accumulation_steps", "2")])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_models, mode):
    import backends.cuda as backend
    from common.training.train_loop import run_training
    # 5 images, batch 1: an epoch is 5 micro-batches, so 6 steps cross an epoch boundary
    full = run_training(args_for(tmp_path / "full", tiny_models["v1"], "--max_train_steps", "6", *mode), backend)
    run_training(args_for(tmp_path / "part", tiny_models["v1"], "--max_train_steps", "4", *mode), backend)
    resumed = run_training(args_for(tmp_path / "part", tiny_models["v1"], "--max_train_steps", "6", "--resume", *mode),
                           backend)
    a, b = full["checkpoint"], resumed["checkpoint"]
    assert os.path.basename(a) == os.path.basename(b)
    if os.path.isdir(a):
        a, b = os.path.join(a, "lora_kohya.safetensors"), os.path.join(b, "lora_kohya.safetensors")
    wa, wb = load_state_dict(a), load_state_dict(b)
    assert set(wa) == set(wb)
    worst = max(float(np.abs(wa[k].astype(np.float64) - wb[k]).max()) for k in wa)
    assert worst == 0.0, worst
    full_log = (tmp_path / "full" / "loss.csv").read_text().splitlines()
    part_log = (tmp_path / "part" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in full_log] == [r.split(",")[2] for r in part_log]


def test_two_process_data_parallel_equals_one_process(tmp_path, tiny_models):
    """DreamBooth with class images generated on the way, on 2 accelerate processes (CPU, gloo):
    the main process alone writes exactly --num_class_images files (the same ones one process
    writes), the result equals one process with the global batch, and --overwrite True starts
    over on 2 processes without racing. The accelerate config says bf16: our fp32 holds."""
    pytest.importorskip("accelerate")
    common = ["train_dreambooth.py", "--model_config", TINY["v1"], "--pretrained_model_path", tiny_models["v1"],
              "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
              "--class_prompt", "a photo of a robot", "--num_class_images", "5", "--sample_batch_size", "2",
              "--sampling_steps", "2", "--image_size", "64", "--train_data_repeats", "2", "--mixed_precision", "no",
              "--max_train_steps", "3", "--start_learning_rate", "1e-3", "--seed", "5", "--adam_epsilon", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run_script(*common, "--train_batch_size", "2", "--output_path", tmp_path / "one",
               "--class_data_dir", tmp_path / "class_one")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    # accelerate's --cpu launcher needs mpirun for several processes; --multi_gpu on a machine without
    # GPUs starts them through torchrun and the processes fall back to the CPU with gloo

    def launch(*extra):
        return subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port",
                               str(free_port()), *common, "--train_batch_size", "1", "--output_path",
                               str(tmp_path / "two"), "--class_data_dir", str(tmp_path / "class_two"), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    two = launch()
    assert two.returncode == 0, two.stderr[-3000:]
    made = sorted(os.listdir(tmp_path / "class_two"))
    assert made == sorted(os.listdir(tmp_path / "class_one")) and len(made) == 5, made
    assert all((tmp_path / "class_two" / n).read_bytes() == (tmp_path / "class_one" / n).read_bytes() for n in made)
    assert two.stderr.count("generating 5 class images") == 1
    assert "accelerate config asks for mixed precision bf16" in two.stderr
    wa = load_state_dict(str(tmp_path / "one" / "ckpt" / "sd-3.safetensors"))
    wb = load_state_dict(str(tmp_path / "two" / "ckpt" / "sd-3.safetensors"))
    base = load_state_dict(tiny_models["v1"])
    unet = [k for k in wa if k.startswith("model.diffusion_model.")]
    moved = max(float(np.abs(wa[k] - base[k]).max()) for k in unet)
    worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in unet)
    assert moved > 1e-4 and worst < 1e-3 * moved, (moved, worst)
    assert "batch 1 x 2 process(es)" in two.stderr
    assert (tmp_path / "two" / "loss.csv").exists() and not (tmp_path / "two" / "ckpt" / "sd-3.safetensors.tmp").exists()
    again = launch("--overwrite", "True")
    assert again.returncode == 0, again.stderr[-3000:]
    wc = load_state_dict(str(tmp_path / "two" / "ckpt" / "sd-3.safetensors"))
    assert all(np.array_equal(wb[k], wc[k]) for k in unet)


def _replace_calls(monkeypatch, fail_at=None, after=False):
    """Record os.replace calls (every atomic write ends in one); raise KeyboardInterrupt (a kill)
    at call `fail_at`, before the rename (the temporary file is complete but not in place) or
    right after it (killed before the next write)."""
    calls, real = [], os.replace

    def replace(src, dst):
        calls.append(os.path.basename(str(dst)))
        if len(calls) - 1 == fail_at and not after:
            shutil.copyfile(src, str(src) + ".killed.tmp")    # what a real kill leaves behind
            raise KeyboardInterrupt
        real(src, dst)
        if len(calls) - 1 == fail_at and after:
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("backend_name", ["cuda", "ascend"])
def test_killed_at_any_point_of_saving_resumes_bit_exactly(tmp_path, tiny_models, monkeypatch, backend_name):
    """Every rename of the save sequence (checkpoint, training state, commit record, in the
    first and the second save), killed before or after it: `--resume` then ends bit-identical to
    the uninterrupted run, with each step once in loss.csv and no temporary file left. The ascend
    backend (slower) is killed at one point: renaming its own training-state file into place."""
    from backends import load_backend
    from common.training.train_loop import run_training

    backend = load_backend(backend_name)

    def train(out, steps, *extra):
        return run_training(args_for(out, tiny_models["v1"], "--max_train_steps", str(steps), "--backend",
                                     backend_name, "--mode", "1", "--image_size", "32", "--ckpt_max_keep", "1",
                                     "--with_prior_preservation", "False", *extra), backend)

    # cuda: every rename of two saves, then resume to step 6; ascend (PyNative, slower): killed
    # while renaming its own first training-state file into place, then resume to step 4
    total = 6 if backend_name == "cuda" else 4
    full = train(tmp_path / "full", total)
    want = load_state_dict(full["checkpoint"])
    full_log = (tmp_path / "full" / "loss.csv").read_text().splitlines()
    sequence = ["sd-2.safetensors", "train_state-2.pt", "train_state.json",
                "sd-4.safetensors", "train_state-4.pt", "train_state.json"]
    if backend_name == "cuda":
        calls = _replace_calls(monkeypatch)
        train(tmp_path / "probe", 4)
        assert [c for c in calls if not c.endswith(".csv")] == sequence
        points = [(i, after) for i in range(len(sequence)) for after in (False, True)]
    else:
        points = [(1, False)]
    for index, after in points:
        out = tmp_path / f"kill-{index}-{after}"
        _replace_calls(monkeypatch, index, after)
        with pytest.raises(KeyboardInterrupt):
            train(out, 4)
        monkeypatch.setattr(os, "replace", os.rename)
        resumed = train(out, total, "--resume")
        got = load_state_dict(resumed["checkpoint"])
        assert os.path.basename(resumed["checkpoint"]) == f"sd-{total}.safetensors"
        assert all(np.array_equal(want[k], got[k]) for k in want), (index, after)
        rows = (out / "loss.csv").read_text().splitlines()
        assert [r.rsplit(",", 1)[0] for r in rows] == [r.rsplit(",", 1)[0] for r in full_log], (index, after)
        assert sorted(os.listdir(out / "ckpt")) == [f"sd-{total}.safetensors", f"train_state-{total}.pt",
                                                    "train_state.json"]
