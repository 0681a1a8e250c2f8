"""Bad values and bad places are one `error:` line before any work starts, on every entry point."""
import os

import pytest

from conftest import ROOT, SUBJECT, TINY
from test_cli import assert_one_line_error, run, sample, train
from common.cli import check_output_dir, check_output_file
from common.errors import UserError

BACKENDS = ["cuda", "ascend"]


@pytest.mark.parametrize("flag,value,needle", [
    ("--start_learning_rate", "0", "must be > 0"), ("--learning_rate", "-1e-4", "must be > 0"),
    ("--weight_decay", "-0.1", "must be >= 0"), ("--train_batch_size", "0", "must be >= 1"),
    ("--epochs", "0", "must be >= 1"), ("--max_train_steps", "0", "must be >= 1"),
    ("--gradient_accumulation_steps", "0", "must be >= 1"), ("--ckpt_save_steps", "0", "must be >= 1"),
    ("--adam_epsilon", "0", "must be > 0"), ("--lora_rank", "0", "must be >= 1"),
    ("--prior_loss_weight", "nan", "expected a number"), ("--image_size", "abc", "expected an integer"),
])
def test_train_numeric_ranges(tmp_path, tiny_models, flag, value, needle):
    proc = train(tmp_path / "run", tiny_models["v1"], TINY["v1"], "--with_prior_preservation", "False",
                 f"{flag}={value}", check=False)          # '=': argparse takes '-1e-4' for a flag otherwise
    assert_one_line_error(proc, flag, needle)
    assert not (tmp_path / "run").exists()


def test_betas_in_yaml_are_checked(tmp_path, tiny_models):
    config = tmp_path / "train.yaml"
    config.write_text("betas: [0.9, 1.0]\n")
    proc = train(tmp_path / "run", tiny_models["v1"], TINY["v1"], "--train_config", str(config), check=False)
    assert_one_line_error(proc, "betas", "must be < 1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_size_must_fit_the_model(tmp_path, tiny_models, backend):
    proc = train(tmp_path / "run", tiny_models["v1"], TINY["v1"], "--with_prior_preservation", "False",
                 "--backend", backend, "--image_size", "60", check=False)
    assert_one_line_error(proc, "--image_size 60", "multiples of 8")
    assert not (tmp_path / "run").exists()
    proc = sample(tmp_path / "t2i", tiny_models["v1"], TINY["v1"], "--backend", backend, "--H", "36", check=False)
    assert_one_line_error(proc, "--H 36", "multiples of 8")


@pytest.mark.parametrize("args,needle", [
    (("--n_samples", "0"), "--n_samples"), (("--n_iter", "0"), "--n_iter"), (("--sampling_steps", "0"), "--sampling_steps"),
    (("--use_lora", "True"), "--use_lora True needs --lora_ckpt_path"),
    (("--lora_ckpt_path", "x.safetensors"), "--use_lora is False"),
])
def test_text_to_image_values_and_combinations(tmp_path, tiny_models, args, needle):
    proc = sample(tmp_path / "t2i", tiny_models["v1"], TINY["v1"], *args, check=False)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "t2i").exists()


def test_lora_for_another_base_model(tmp_path, tiny_models):
    from common.formats import lora as lora_fmt
    from common.arch import load_arch
    from common.formats.checkpoint_io import save_state_dict

    arch = load_arch(TINY["v1"])
    kohya = lora_fmt.to_kohya(lora_fmt.init_lora(arch, 2, 2.0, 0, unet=True, text_encoder=False))
    path = tmp_path / "lora.safetensors"
    save_state_dict(str(path), kohya, metadata={"ss_v2": "True", "ss_network_module": "networks.lora"})
    proc = sample(tmp_path / "t2i", tiny_models["v1"], TINY["v1"], "--use_lora", "True", "--lora_ckpt_path",
                  str(path), check=False)
    assert_one_line_error(proc, "SD 2.x", "SD 1.x")
    save_state_dict(str(path), kohya, metadata={"ss_base_model_version": "sd_v1"}, overwrite=True)
    sample(tmp_path / "ok", tiny_models["v1"], TINY["v1"], "--use_lora", "True", "--lora_ckpt_path", str(path),
           "--n_samples", "1", "--H", "32", "--W", "32")
    import numpy as np
    key = next(k for k in kohya if k.endswith("lora_up.weight"))
    save_state_dict(str(path), dict(kohya, **{key: np.zeros((7, 2), np.float32)}), overwrite=True)
    proc = sample(tmp_path / "t2i", tiny_models["v1"], TINY["v1"], "--use_lora", "True", "--lora_ckpt_path",
                  str(path), check=False)
    assert_one_line_error(proc, "do not fit its weight", "another architecture")


def test_output_locations(tmp_path, tiny_models):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for out, needle in ((a_file, "is a file"), (a_file / "sub", "is a file")):
        proc = train(out, tiny_models["v1"], TINY["v1"], "--with_prior_preservation", "False", check=False)
        assert_one_line_error(proc, "--output_path", needle)
        proc = sample(out, tiny_models["v1"], TINY["v1"], check=False)
        assert_one_line_error(proc, "--output_path", needle)
    proc = train(tmp_path / "run", tiny_models["v1"], TINY["v1"], "--class_data_dir", str(a_file / "cls"),
                 "--class_prompt", "a robot", check=False)
    assert_one_line_error(proc, "--class_data_dir", "is a file")
    proc = run("tools/eval/eval_clip_i_score.py", "--ckpt_path", "x", "--gen_image_path_or_dir", SUBJECT,
               "--real_image_path_or_dir", SUBJECT, "--save_result", "True", "--result_path", str(a_file / "r.json"),
               check=False)
    assert_one_line_error(proc, "--result_path", "is a file")
    assert a_file.read_text() == "mine" and not (tmp_path / "run").exists()


def test_output_checks_for_permissions_and_read_only(tmp_path, monkeypatch):
    check_output_dir(str(tmp_path / "new" / "deeper"), "--output_path")      # creatable: fine, nothing made
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(str(tmp_path), "--result_path")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="not writable"):
        check_output_dir(str(tmp_path / "x"), "--output_path")
    monkeypatch.undo()

    class ReadOnly:
        f_flag = os.ST_RDONLY
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    with pytest.raises(UserError, match="read-only file system"):
        check_output_dir(str(tmp_path / "x"), "--output_path")


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KB file system (tmpfs; needs root and mount rights, else the test is skipped)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(small_disk, tiny_models):
    out = small_disk / "run"
    proc = train(out, tiny_models["v1"], TINY["v1"], "--with_prior_preservation", "False", check=False)
    assert_one_line_error(proc, "disk full writing", "sd-2.safetensors", "free", "needs about")
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")      # after the progress bar
    leftovers = [f for _, _, files in os.walk(small_disk) for f in files if f.endswith(".tmp")]
    assert leftovers == []


def test_disk_full_keeps_the_last_complete_checkpoint(tmp_path, tiny_models, monkeypatch):
    import errno

    import backends.cuda as backend
    from common.formats import checkpoint_io
    from common.training.train_loop import run_training
    from common.training.train_args import parse_train_args

    real, calls = checkpoint_io._write_safetensors, []

    def write(f, plan, meta):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, plan, meta)
    monkeypatch.setattr(checkpoint_io, "_write_safetensors", write)
    args = parse_train_args(["--model_config", TINY["v1"], "--pretrained_model_path", tiny_models["v1"],
                             "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
                             "--with_prior_preservation", "False", "--image_size", "32", "--train_batch_size", "1",
                             "--max_train_steps", "2", "--ckpt_save_steps", "1", "--output_path", str(tmp_path / "run")])
    with pytest.raises(UserError, match="disk full writing .*sd-2.safetensors"):
        run_training(args, backend)
    assert sorted(os.listdir(tmp_path / "run" / "ckpt")) == ["sd-1.safetensors", "train_state-1.pt", "train_state.json"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_is_exit_130_with_one_message_on_both_backends(tmp_path, tiny_models, backend):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "text_to_image.py", "--backend", backend, "--config", TINY["v1"],
                             "--ckpt_path", tiny_models["v1"], "--n_samples", "1", "--n_iter", "40",
                             "--sampling_steps", "500", "--H", "32", "--W", "32", "--ms_mode", "1",
                             "--output_path", str(tmp_path)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            # as from a terminal: a parallel test worker may run with SIGINT ignored, which a
                            # child inherits (and then, rightly, keeps: nohup and `&` rely on that)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""     # 40 x 500 steps: far from done when the signal comes, however loaded the machine
    while "1/500" not in seen and "2/500" not in seen:       # sampling has started
        char = proc.stderr.read(1)
        assert char, seen[-2000:]
        seen += char
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 130, (seen + rest)[-2000:]
    assert (seen + rest).strip().splitlines()[-1] == "interrupted; resume with --resume"


def test_mindspore_debug_files_stay_out_of_the_working_directory(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, %r)\n"
            "from common.cli import run_cli\n"
            "def main():\n"
            "    import backends.ascend.device  # how every ascend path starts MindSpore\n"
            "    import mindspore as ms, numpy as np\n"
            "    from mindspore import nn, ops, Tensor\n"
            "    ms.set_device('CPU'); ms.set_context(mode=0)\n"
            "    class Bad(nn.Cell):\n"
            "        def construct(self, x):\n"
            "            return ops.concat((x, x.reshape(4, 1)), 0)\n"
            "    try:\n"
            "        Bad()(Tensor(np.ones((2, 2), np.float32)))\n"
            "    except ValueError:\n"
            "        return 0\n"
            "    return 1\n"
            "run_cli(main)\n") % ROOT
    script = tmp_path / "bad_graph.py"                # graph mode reads the Cell's source from a file
    script.write_text(code)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.listdir(cwd) == []
