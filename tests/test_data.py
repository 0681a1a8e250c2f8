"""Tests for common/training/data.py (DreamBooth data pipeline) and the procedural sample subject."""
from __future__ import annotations

import importlib.util
import io
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

from common.training.data import DreamBoothDataset, count_images, list_images, load_image
from common.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_tokenizer(prompts):
    """Stands in for common.tokenizer.CLIPTokenizer: prompt characters as ids, padded to 77."""
    out = np.zeros((len(prompts), 77), np.int64)
    for i, p in enumerate(prompts):
        codes = [49406] + [ord(c) for c in p[:75]] + [49407]
        out[i, : len(codes)] = codes
    return out


def save_rgb(path, arr):
    Image.fromarray(np.asarray(arr, np.uint8), "RGB").save(path)
    return str(path)


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(folder, colours, size=(24, 20), textured=False):
    """One image per colour, named so sorted order follows the list."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colours):
        arr = np.empty((size[1], size[0], 3), np.uint8)
        arr[:] = c
        if textured:  # texture makes crops and flips visible while the colour still identifies the image
            arr = np.clip(arr.astype(int) + noise(size[1], size[0], i) // 8, 0, 255)
        save_rgb(folder / f"img_{i:02d}.png", arr)
    return str(folder)


def to_uint8(chw):
    return np.rint((chw.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.int64)


# ---------------------------------------------------------------- transforms


def test_shorter_side_resize_and_center_crop(tmp_path):
    # 128 x 64 landscape: red | green | blue columns of width 32 | 64 | 32.
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:96] = (0, 255, 0)
    arr[:, 96:] = (0, 0, 255)
    path = save_rgb(tmp_path / "wide.png", arr)
    out = load_image(path, 32, "center", False, None)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    # shorter side 64 -> 32 makes the image 64 x 32; the center crop is the green middle
    inner = to_uint8(out)[:, 2:-2]
    assert np.all(np.abs(inner - (0, 255, 0)) <= 3)

    # portrait: the width is the shorter side
    path = save_rgb(tmp_path / "tall.png", arr.transpose(1, 0, 2))
    assert load_image(path, 16, "center", False, None).shape == (3, 16, 16)


def test_value_mapping_is_x_over_127_5_minus_1(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255
    arr[:, 4:] = (0, 51, 204)
    out = load_image(save_rgb(tmp_path / "v.png", arr), 8, "center", False, None)
    assert np.all(out[:, :, :4] == 1.0)
    np.testing.assert_allclose(out[:, 0, 4], np.array([0, 51, 204]) / 127.5 - 1.0, atol=1e-6)


def test_random_crop_is_determined_by_the_rng(tmp_path):
    path = save_rgb(tmp_path / "n.png", noise(32, 48, 0))
    a = load_image(path, 32, "random", False, np.random.default_rng(7))
    b = load_image(path, 32, "random", False, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    crops = {load_image(path, 32, "random", False, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(crops) > 1
    # every random crop is a window of the (unresized) source
    src = noise(32, 48, 0)
    got = to_uint8(a)
    assert any(np.array_equal(got, src[:, x:x + 32]) for x in range(17))
    with pytest.raises(ValueError):
        load_image(path, 32, "random", False, None)


def test_flip_mirrors_left_right(tmp_path):
    path = save_rgb(tmp_path / "n.png", noise(20, 20, 1))
    plain = load_image(path, 20, "center", False, None)
    flipped = load_image(path, 20, "center", True, None)
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
    assert not np.array_equal(flipped, plain)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 tall: red left half, blue right half. Orientation 6 means "rotate 90
    # degrees clockwise to display", giving 20 x 40 with red on top and blue at the bottom.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "rot.jpg")
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    out = to_uint8(load_image(path, 20, "center", False, None))  # crops rows 10..30 of the upright image
    top, bottom = out[:8].mean(axis=(0, 1)), out[-8:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # without the transpose the crop would be red on the left and blue on the right instead
    assert abs(out[:, :5].mean() - out[:, -5:].mean()) < 10


def test_other_modes_become_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (10, 10), 100).save(gray)
    out = load_image(str(gray), 10, "center", False, None)
    np.testing.assert_allclose(out, 100 / 127.5 - 1.0, atol=1e-6)

    # RGBA: transparent pixels are composited on white, opaque ones keep their colour
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, 5:] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = to_uint8(load_image(str(tmp_path / "rgba.png"), 10, "center", False, None))
    assert np.all(out[:, :5] == 255) and np.all(out[:, 5:] == (255, 0, 0))

    # palette, with and without a transparent index
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    out = to_uint8(load_image(str(tmp_path / "pal.png"), 10, "center", False, None))
    assert np.all(out == (10, 200, 30))
    pal.save(tmp_path / "pal_t.png", transparency=1)
    out = to_uint8(load_image(str(tmp_path / "pal_t.png"), 10, "center", False, None))
    assert np.all(out == 255)

    # 16-bit grayscale is rescaled, not clipped to white
    Image.fromarray(np.full((10, 10), 128 * 257, np.uint16)).save(tmp_path / "g16.png")
    out = to_uint8(load_image(str(tmp_path / "g16.png"), 10, "center", False, None))
    assert np.all(out == 128)

    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    out = load_image(str(tmp_path / "cmyk.jpg"), 10, "center", False, None)
    assert out.shape == (3, 10, 10) and out.min() > 0.9


# ---------------------------------------------------------------- bad inputs


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="instance data dir not found"):
        list_images(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="class data dir not found"):
        list_images(str(tmp_path / "nope"), role="class")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable images"):
        list_images(str(tmp_path / "empty"))
    assert count_images(str(tmp_path / "nope")) == 0
    assert count_images(str(tmp_path / "empty")) == 0


def test_folder_with_no_usable_image(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("a photo of sks robot")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level(logging.WARNING, logger="common.training.data"):
        with pytest.raises(UserError, match="no readable images"):
            list_images(str(tmp_path))
    assert "corrupt.png" in caplog.text and "notes.txt" not in caplog.text


def test_corrupt_files_are_skipped_with_one_warning(tmp_path, caplog):
    save_rgb(tmp_path / "b_good.png", noise(16, 16, 0))
    save_rgb(tmp_path / "a_good.jpg", noise(16, 16, 1))
    (tmp_path / "bad.png").write_bytes(os.urandom(200))
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64, 2)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "weights.bin").write_bytes(b"not an image")
    (tmp_path / "README.md").write_text("# about these photos")
    (tmp_path / "captions.json").write_text("{}")
    (tmp_path / "metadata.csv").write_text("file,text\n")
    save_rgb(tmp_path / ".hidden.png", noise(16, 16, 3))
    (tmp_path / "subdir.png").mkdir()

    with caplog.at_level(logging.WARNING, logger="common.training.data"):
        paths = list_images(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["a_good.jpg", "b_good.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    for name in ("bad.png", "truncated.jpg", "weights.bin"):
        assert name in msg
    for name in ("captions.json", "metadata.csv", "README.md", ".hidden.png", "good"):
        assert name not in msg
    assert count_images(str(tmp_path)) == 2


def test_upper_case_extensions_are_images(tmp_path):
    save_rgb(tmp_path / "A.PNG", noise(8, 8, 0))
    Image.fromarray(noise(8, 8, 1)).save(tmp_path / "B.JPEG", "JPEG")
    assert len(list_images(str(tmp_path))) == 2


def test_dataset_argument_errors(tmp_path):
    inst = make_folder(tmp_path / "inst", [(255, 0, 0)])
    with pytest.raises(UserError, match="train_data_repeats"):
        DreamBoothDataset(inst, "p", fake_tokenizer, 16, repeats=0)
    with pytest.raises(UserError, match="class_prompt"):
        DreamBoothDataset(inst, "p", fake_tokenizer, 16, class_dir=inst)
    with pytest.raises(UserError, match="class data dir not found"):
        DreamBoothDataset(inst, "p", fake_tokenizer, 16, class_dir=str(tmp_path / "x"), class_prompt="c")


# ---------------------------------------------------------------- dataset and batches


def test_repeats_length_and_steps(tmp_path):
    inst = make_folder(tmp_path / "inst", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    ds = DreamBoothDataset(inst, "a photo of sks robot", fake_tokenizer, 16, repeats=4)
    assert len(ds) == 12
    assert np.bincount(ds.epoch_order(0), minlength=3).tolist() == [4, 4, 4]
    assert ds.steps_per_epoch(5) == 2
    assert ds.steps_per_epoch(5, drop_last=False) == 3
    assert ds.steps_per_epoch(2, world_size=3) == 2
    assert len(list(ds.batches(5, 0))) == 2
    with pytest.raises(UserError, match="train_data_repeats"):
        ds.steps_per_epoch(8, world_size=2)  # 12 items < one global batch of 16


def test_last_batch_is_padded_when_not_dropping(tmp_path):
    inst = make_folder(tmp_path / "inst", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (99, 99, 99)])
    ds = DreamBoothDataset(inst, "p", fake_tokenizer, 8)
    batches = list(ds.batches(2, 0, drop_last=False))
    assert [b["instance_images"].shape[0] for b in batches] == [2, 2, 2]
    # the padding wraps to the start of the epoch's order
    np.testing.assert_array_equal(batches[2]["instance_images"][1], batches[0]["instance_images"][0])


def test_batches_shapes_and_ids(tmp_path):
    inst = make_folder(tmp_path / "inst", [(255, 0, 0), (0, 255, 0)])
    ds = DreamBoothDataset(inst, "a photo of sks robot", fake_tokenizer, 16, repeats=2)
    batch = next(ds.batches(2, 0))
    assert set(batch) == {"instance_images", "instance_ids", "instance_paths"}
    assert all(p in ds.instance_paths for p in batch["instance_paths"]) and len(batch["instance_paths"]) == 2
    assert batch["instance_images"].shape == (2, 3, 16, 16) and batch["instance_images"].dtype == np.float32
    assert batch["instance_ids"].shape == (2, 77) and batch["instance_ids"].dtype == np.int64
    expected = fake_tokenizer(["a photo of sks robot"])[0]
    assert all(np.array_equal(row, expected) for row in batch["instance_ids"])


def _epoch(ds, epoch, **kw):
    return np.concatenate([b["instance_images"] for b in ds.batches(2, epoch, **kw)])


def test_batches_are_deterministic_per_seed_and_epoch(tmp_path):
    inst = make_folder(tmp_path / "inst", [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 0)], size=(28, 20),
                       textured=True)
    kw = dict(repeats=2, random_crop=True, flip=True)
    a = DreamBoothDataset(inst, "p", fake_tokenizer, 16, seed=3, **kw)
    b = DreamBoothDataset(inst, "p", fake_tokenizer, 16, seed=3, **kw)
    np.testing.assert_array_equal(_epoch(a, 0), _epoch(b, 0))
    assert not np.array_equal(_epoch(a, 0), _epoch(a, 1))
    c = DreamBoothDataset(inst, "p", fake_tokenizer, 16, seed=4, **kw)
    assert not np.array_equal(_epoch(a, 0), _epoch(c, 0))
    # resuming mid-epoch gives the same later batches
    full = list(a.batches(2, 1))
    resumed = list(a.batches(2, 1, start_step=2))
    assert len(resumed) == len(full) - 2
    for x, y in zip(full[2:], resumed):
        np.testing.assert_array_equal(x["instance_images"], y["instance_images"])


def test_epoch_follows_the_documented_streams(tmp_path):
    """The order and augmentation contract from the docs, rebuilt from common.rng directly."""
    from common.rng import Streams

    inst = make_folder(tmp_path / "inst", [(200, 0, 0), (0, 200, 0), (0, 0, 200)], size=(28, 20), textured=True)
    ds = DreamBoothDataset(inst, "p", fake_tokenizer, 16, seed=5, repeats=2, random_crop=True, flip=True)
    streams = Streams(5)
    order = (np.arange(6) % 3)[streams.generator("data.shuffle", 1).permutation(6)]
    np.testing.assert_array_equal(ds.epoch_order(1), order)
    expected = []
    for g in range(6):
        rng = streams.generator("data.augment", 1, g)
        flip = rng.random() < 0.5
        expected.append(load_image(ds.instance_paths[order[g]], 16, "random", flip, rng))
    np.testing.assert_array_equal(_epoch(ds, 1), np.stack(expected))
    assert len({ds.epoch_order(e).tobytes() for e in range(6)}) > 1


def test_ranks_read_disjoint_shards_that_make_up_the_epoch(tmp_path):
    colours = [(i * 30, 255 - i * 30, (i * 70) % 256) for i in range(8)]
    inst = make_folder(tmp_path / "inst", colours)
    ds = DreamBoothDataset(inst, "p", fake_tokenizer, 8, seed=11)

    def colour_ids(images):
        return [colours.index(tuple(to_uint8(im)[0, 0])) for im in images]

    single = colour_ids(_epoch(ds, 2))
    r0 = [colour_ids(b["instance_images"]) for b in ds.batches(2, 2, rank=0, world_size=2)]
    r1 = [colour_ids(b["instance_images"]) for b in ds.batches(2, 2, rank=1, world_size=2)]
    assert len(r0) == len(r1) == 2
    flat0, flat1 = sum(r0, []), sum(r1, [])
    assert not set(flat0) & set(flat1)
    assert sorted(flat0 + flat1) == list(range(8))
    # step by step, rank 0's slice then rank 1's is the single-process order
    assert sum((x + y for x, y in zip(r0, r1)), []) == single

    # with crops and flips too, a sharded item is augmented exactly as in one process
    tex = make_folder(tmp_path / "tex", colours, size=(24, 20), textured=True)
    ds = DreamBoothDataset(tex, "p", fake_tokenizer, 16, seed=5, random_crop=True, flip=True)
    one = list(ds.batches(4, 0))
    two = [list(ds.batches(2, 0, rank=r, world_size=2)) for r in (0, 1)]
    for step, whole in enumerate(one):
        got = np.concatenate([two[0][step]["instance_images"], two[1][step]["instance_images"]])
        np.testing.assert_array_equal(got, whole["instance_images"])


def test_class_images_and_ids(tmp_path):
    inst = make_folder(tmp_path / "inst", [(255, 0, 0), (0, 255, 0)])
    class_colours = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]
    cls = make_folder(tmp_path / "cls", class_colours, size=(30, 16))
    ds = DreamBoothDataset(inst, "a sks robot", fake_tokenizer, 8, class_dir=cls, class_prompt="a robot",
                           repeats=6)
    picked = []
    for batch in ds.batches(4, 0):
        assert batch["class_images"].shape == (4, 3, 8, 8) and batch["class_images"].dtype == np.float32
        assert batch["class_ids"].shape == (4, 77) and batch["class_ids"].dtype == np.int64
        assert all(np.array_equal(r, fake_tokenizer(["a robot"])[0]) for r in batch["class_ids"])
        assert all(np.array_equal(r, fake_tokenizer(["a sks robot"])[0]) for r in batch["instance_ids"])
        picked += [class_colours.index(tuple(to_uint8(im)[0, 0])) for im in batch["class_images"]]
    assert len(picked) == 12 and len(set(picked)) > 1  # drawn from the whole class list


# ---------------------------------------------------------------- sample subject


def _load_tool(monkeypatch):
    spec = importlib.util.spec_from_file_location("make_sample_subject",
                                                  os.path.join(REPO, "tools", "make_sample_subject.py"))
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_committed_sample_subject_is_usable(caplog):
    folder = os.path.join(REPO, "assets", "sample_subject")
    with caplog.at_level(logging.WARNING, logger="common.training.data"):
        paths = list_images(folder)
    assert len(paths) == 5 and not caplog.records  # its README.md is ignored silently
    for p in paths:
        assert os.path.getsize(p) < 60_000
        with Image.open(p) as im:
            assert im.size == (256, 256)
    assert load_image(paths[0], 64, "center", False, None).shape == (3, 64, 64)


def test_make_sample_subject_is_deterministic_and_refuses_overwrite(tmp_path, capsys, monkeypatch):
    tool = _load_tool(monkeypatch)
    out = str(tmp_path / "subject")
    assert tool.main(["--output", out, "--size", "48"]) == 0
    first = {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}
    assert len(first) == 5
    assert tool.main(["--output", out, "--size", "48"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tool.main(["--output", out, "--size", "48", "--overwrite"]) == 0
    assert {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))} == first
    # the views really differ from each other
    arrays = [np.asarray(Image.open(os.path.join(out, n))) for n in first]
    assert all(not np.array_equal(arrays[0], a) for a in arrays[1:])


def test_the_committed_sample_subject_is_what_the_tool_draws(tmp_path, monkeypatch):
    """make_sample_subject.draw_robot also draws the synthetic world's robots (other styles); the
    sample subject it draws by default stays byte-identical to the committed images."""
    tool = _load_tool(monkeypatch)
    assert tool.main(["--output", str(tmp_path)]) == 0
    folder = os.path.join(REPO, "assets", "sample_subject")
    for name in tool.output_names():
        assert open(tmp_path / name, "rb").read() == open(os.path.join(folder, name), "rb").read(), name


def test_worker_threads_and_the_image_cache_change_no_batch(tmp_path, monkeypatch):
    """Decoded, resized images are cached (each file is decoded once however many epochs and
    repeats read it), and worker threads building batches ahead give the very same batches in
    the same order, also when a resume starts mid-epoch."""
    import common.training.data as data

    inst = make_folder(tmp_path / "inst", [(255, 0, 0), (0, 255, 0), (0, 0, 255)], size=(40, 28), textured=True)
    cls = make_folder(tmp_path / "cls", [(9, 9, 9), (99, 99, 99)], size=(30, 36), textured=True)
    decoded = []
    real = data.load_resized
    monkeypatch.setattr(data, "load_resized", lambda path, *a: decoded.append(path) or real(path, *a))
    kw = dict(class_dir=cls, class_prompt="c", repeats=4, random_crop=True, flip=True, seed=3)
    plain = DreamBoothDataset(inst, "p", fake_tokenizer, 16, cache_bytes=0, **kw)
    threaded = DreamBoothDataset(inst, "p", fake_tokenizer, 16, workers=2, **kw)
    for epoch in (0, 1):
        for start in (0, 2):
            a = list(plain.batches(2, epoch, start_step=start))
            b = list(threaded.batches(2, epoch, start_step=start))
            assert len(a) == len(b) == 6 - start
            for x, y in zip(a, b):
                assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    uncached = len(decoded) - 5
    assert uncached == 2 * 2 * 2 * (6 + 4)           # plain: 2 images per item, every time
    assert len(decoded) - uncached == 5              # threaded: each of the 5 files once


def test_the_image_cache_keeps_within_its_budget(tmp_path):
    inst = make_folder(tmp_path / "inst", [(255, 0, 0), (0, 255, 0), (0, 0, 255)], size=(16, 16))
    one_image = 3 * 8 * 8
    ds = DreamBoothDataset(inst, "p", fake_tokenizer, 8, cache_bytes=2 * one_image)
    list(ds.batches(1, 0))
    assert ds._cache._bytes == 2 * one_image and len(ds._cache._items) == 2
