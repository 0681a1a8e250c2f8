"""The synthetic world the tiny pretrained models learn from (tools/synthetic_world.py)."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def world():
    tools = os.path.join(ROOT, "tools")
    sys.path.insert(0, tools)          # synthetic_world imports its sibling make_sample_subject
    try:
        spec = importlib.util.spec_from_file_location("synthetic_world", os.path.join(tools, "synthetic_world.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(tools)


def test_scenes_and_images_are_the_same_on_every_call(world):
    a, b = world.scenes(12, seed=3), world.scenes(12, seed=3)
    assert a == b and world.scenes(12, seed=4) != a
    for (scene, _), (again, _) in zip(a[:4], b[:4]):
        assert np.array_equal(np.asarray(world.render(scene, 64)), np.asarray(world.render(again, 64)))
    assert np.asarray(world.render(a[0][0], 48)).shape == (48, 48, 3)


def test_the_sample_subject_is_never_shown(world):
    """No robot of the world is teal or has the subject's chest heart; teal is still a colour
    the world shows (on other objects), and every caption names its object's class."""
    items = world.scenes(2000, seed=0)
    robots = [s for s, _ in items if s.cls == "robot"]
    assert len(robots) > 300 and all(s.colour != "teal" for s in robots)
    assert any(s.colour == "teal" for s, _ in items)
    rng = np.random.default_rng(0)
    assert all(world.robot_style(c, rng).heart is None for c in world.ROBOT_COLOURS for _ in range(20))
    assert all(s.cls in caption for s, caption in items)
    assert {s.background for s, _ in items} == set(world.BACKGROUNDS)


def test_the_cli_writes_images_and_captions_and_refuses_to_overwrite(world, tmp_path, capsys):
    out = str(tmp_path / "w")
    assert world.main(["--output", out, "--count", "3", "--size", "32"]) == 0
    lines = open(os.path.join(out, "metadata.jsonl")).read().splitlines()
    assert len(lines) == 3 and sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "metadata.jsonl"]
    assert world.main(["--output", out, "--count", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_the_world_clip_and_dino_know_the_world(world, tmp_path):
    """assets/tiny_world's CLIP and DINO on 100 held-out scenes (a seed they were not trained on):
    the CLIP names the background, the object's class and its colour zero-shot, and the DINO
    embeds scenes of one background together, so their scores mean something within the world.
    Measured when set: background 1.00, class 0.78, colour 0.93, DINO neighbour's background 0.97."""
    from common.evaluation import scores
    from common.evaluation.arguments import clip_tokenizer
    from common.evaluation.models import load_clip_source, load_dino_source

    assets = os.path.join(ROOT, "assets", "tiny_world")
    clip_src = load_clip_source(os.path.join(assets, "world_clip.safetensors"), None, os.path.join(assets, "world_clip.json"))
    dino_src = load_dino_source(os.path.join(assets, "world_dino.safetensors"), None, os.path.join(assets, "world_dino.json"))
    clip, dino = scores.load_clip_encoder("cuda", clip_src), scores.load_dino_encoder("cuda", dino_src)
    tokenizer = clip_tokenizer(clip_src, None)
    held_out = [scene for scene, _ in world.scenes(100, seed=7)]
    paths = []
    for k, scene in enumerate(held_out):
        paths.append(str(tmp_path / f"{k:03d}.png"))
        world.render(scene).save(paths[-1])
    images = scores.embed_images(clip, paths, scores.CLIP_MEAN, scores.CLIP_STD)

    def zero_shot(names, texts, truth):
        picks = scores.cosine_matrix(images, scores.embed_texts(clip, tokenizer, texts)).argmax(axis=1)
        return float(np.mean([names[i] == t for i, t in zip(picks, truth)]))

    backgrounds = list(world.BACKGROUNDS)
    colours = sorted({s.colour for s in held_out})
    accuracy = {
        "background": zero_shot(backgrounds, [f"a robot {world.BACKGROUNDS[b]}" for b in backgrounds],
                                [s.background for s in held_out]),
        "class": zero_shot(world.CLASSES, [f"a photo of a {c}" for c in world.CLASSES], [s.cls for s in held_out]),
        "colour": zero_shot(colours, [f"a {c} robot" for c in colours], [s.colour for s in held_out]),
    }
    dino_emb = scores.embed_images(dino, paths, scores.IMAGENET_MEAN, scores.IMAGENET_STD)
    similar = scores.cosine_matrix(dino_emb, dino_emb)
    np.fill_diagonal(similar, -np.inf)
    accuracy["dino_neighbour_background"] = float(np.mean(
        [held_out[j].background == s.background for s, j in zip(held_out, similar.argmax(axis=1))]))
    assert accuracy["background"] >= 0.95 and accuracy["dino_neighbour_background"] >= 0.95, accuracy
    assert accuracy["class"] >= 0.7 and accuracy["colour"] >= 0.75, accuracy   # chance: 0.25 and 1/12
