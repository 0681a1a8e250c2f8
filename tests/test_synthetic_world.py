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
