"""TensorBoardLog: event files TensorBoard's own reader reads back, written without torch or TensorFlow."""
import importlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from common.errors import UserError

pytest.importorskip("tensorboard")
from common.training.tensorboard_log import MISSING, TensorBoardLog  # noqa: E402


def read(logdir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def test_scalars_and_image_read_back(tmp_path):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # not square: height and width kept apart
    logged = {}
    with TensorBoardLog(str(tmp_path)) as tb:
        for step in range(0, 50, 10):
            values = {"train/loss": 1.0 / (step + 3), "train/lr": 1e-4 * step}
            tb.scalars(step, values)
            logged[step] = values
        tb.image(30, "validation/samples", picture)
        with pytest.raises(ValueError):
            tb.image(30, "validation/samples", picture.astype(np.float32))
    assert [p.name.startswith("events.out.tfevents.") for p in tmp_path.iterdir()] == [True]

    acc = read(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/lr"]
    for tag in ("train/loss", "train/lr"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == sorted(logged)
        assert [e.value for e in events] == [np.float32(logged[e.step][tag]) for e in events]
    [image] = acc.Images("validation/samples")
    assert (image.step, image.width, image.height) == (30, 40, 24)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), picture)


# Imports of torch or tensorflow are refused and recorded, even ones tensorboard would catch and get
# past: the log must never reach for them, since on an install that has them they would load.
WITHOUT = r"""
import sys
tried = []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "tensorflow"):
            tried.append(name)
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Block())
import numpy as np
from common.training.tensorboard_log import TensorBoardLog
with TensorBoardLog(sys.argv[1]) as tb:
    tb.scalars(7, {"train/loss": 0.25})
    tb.image(7, "validation/samples", np.full((8, 8, 3), 200, np.uint8))
assert not tried, tried
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow")]
"""


def test_works_without_torch_or_tensorflow(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = read(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(7, 0.25)]
    assert acc.Images("validation/samples")[0].width == 8


def test_missing_tensorboard_is_one_user_error(monkeypatch, tmp_path):
    # None in sys.modules makes an import fail; earlier tests loaded submodules, which would be found
    # by their full names, so block those too. The module itself must still import.
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "common.training.tensorboard_log")
    monkeypatch.delattr(sys.modules["common.training"], "tensorboard_log")  # both put back afterwards
    module = importlib.import_module("common.training.tensorboard_log")
    with pytest.raises(UserError) as e:
        module.TensorBoardLog(str(tmp_path / "tb"))
    assert str(e.value) == MISSING and "\n" not in MISSING
    assert not os.path.exists(tmp_path / "tb")


def test_overwrite_drops_the_old_runs_curves_and_resume_keeps_them(tmp_path):
    """--overwrite True starts the run over: its TensorBoard event files go with its checkpoints
    and loss.csv (a resume keeps them: TensorBoard itself drops the steps logged again)."""
    from common.training.train_loop import STATE_NAME, RunFolder

    root = tmp_path / "run"
    board = TensorBoardLog(str(root / "tb"))
    board.scalars(1, {"train/loss": 1.0})
    board.close()
    (root / "ckpt").mkdir()
    (root / "ckpt" / (STATE_NAME + ".json")).write_text('{"step": 1, "micro_step": 1, "checkpoint": "", "state": ""}')
    (root / "notes.txt").write_text("the user's")
    RunFolder(str(root), "tb").prepare(resume=True, overwrite=False)
    assert len(os.listdir(root / "tb")) == 1
    RunFolder(str(root), "tb").prepare(resume=False, overwrite=True)
    assert os.listdir(root / "tb") == [] and (root / "notes.txt").exists()
