"""The ascend backend's every entry point on an install without torch: sampling, training,
conversion (a torch-written .ckpt read without torch) and evaluation, torch made unimportable."""
import os
import subprocess
import sys

from conftest import ROOT, SUBJECT, TINY

RUNNER = os.path.join(ROOT, "tests", "helpers", "without_torch.py")
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def run(*args):
    proc = subprocess.run([sys.executable, RUNNER, *args], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "blocked" not in proc.stderr
    return proc


def test_blocker_blocks():
    proc = subprocess.run([sys.executable, RUNNER, "-c"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    probe = os.path.join(ROOT, "tests", "helpers", "_probe_torch.py")
    with open(probe, "w") as f:
        f.write("import torch\n")
    try:
        proc = subprocess.run([sys.executable, RUNNER, probe], cwd=ROOT, capture_output=True, text=True)
    finally:
        os.remove(probe)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_ascend_paths_without_torch(tmp_path, tiny_models):
    import torch

    from common.formats.checkpoint_io import load_state_dict

    # a civitai-style torch pickle, converted to MindONE's format without torch
    sd = load_state_dict(tiny_models["v1"])
    pickle_ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "global_step": 7}, pickle_ckpt)
    ms_ckpt = tmp_path / "model_ms.ckpt"
    run("tools/model_conversion/convert_weights.py", "-s", str(pickle_ckpt), "-t", str(ms_ckpt),
        "--config", TINY["v1"], "-sv", "pt")
    # an A1111 textual-inversion .pt (a Parameter inside) is read without torch too
    embedding = tmp_path / "sksemb.pt"
    torch.save({"string_to_param": {"*": torch.nn.Parameter(torch.randn(2, 32))}, "name": "sksemb"}, embedding)
    run("text_to_image.py", "--backend", "ascend", "--config", TINY["v1"], "--ckpt_path", str(pickle_ckpt),
        "--prompt", "a photo of sksemb robot" + ", very detailed" * 30, "--n_samples", "1", "--n_iter", "1",
        "--sampling_steps", "2", "--H", "32", "--W", "32", "--ms_mode", "1", "--output_path", str(tmp_path / "samples"),
        "--ti_ckpt_path", str(embedding), "--support_long_prompts", "True", "--clip_skip", "2")
    run("train_dreambooth.py", "--backend", "ascend", "--mode", "1", "--model_config", TINY["v1"],
        "--pretrained_model_path", str(ms_ckpt), "--instance_data_dir", SUBJECT,
        "--instance_prompt", "a photo of sks robot", "--image_size", "32", "--train_batch_size", "1",
        "--max_train_steps", "2", "--output_path", str(tmp_path / "run"), "--start_learning_rate", "1e-4",
        "--with_prior_preservation", "False")
    assert (tmp_path / "run" / "ckpt" / "sd-2.safetensors").exists()
    run("tools/make_tiny_eval_models.py", "--output_dir", str(tmp_path / "eval"))
    run("tools/eval/eval_clip_score.py", "--backend", "ascend", "--ckpt_path", str(tmp_path / "eval" / "tiny_clip.safetensors"),
        "--config", str(tmp_path / "eval" / "tiny_clip.json"), "--image_path_or_dir", str(tmp_path / "samples" / "samples"),
        "--prompt_or_path", "a photo of sks robot", "--result_path", str(tmp_path / "clip.json"))
    assert (tmp_path / "clip.json").exists()
