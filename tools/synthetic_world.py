#!/usr/bin/env python
"""A small synthetic world of captioned scenes, drawn by the project: robots of many shapes and
colours, mugs, balls and toy cars, big or small, left, centre or right, on the beach, in the
snow, on the grass, on a table or at night. The tiny pretrained models (tools/pretrain_tiny.py)
learn from it, so that "a photo of a red robot on the beach" means something to them.

The sample subject (assets/sample_subject: a teal robot with a yellow chest panel and a magenta
heart) is never shown: no robot of the world is teal, none has a heart, and teal appears only on
other objects, so the colour itself is known. Everything is drawn with PIL from seeds; scene i
of seed s is the same on every machine.

    python tools/synthetic_world.py --output world/ --count 2000 [--size 64] [--seed 0]

writes 00000.png, ... and metadata.jsonl ({"file_name", "text"} per line: Hugging Face's
imagefolder layout).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from make_sample_subject import DARK, SUPERSAMPLE, RobotStyle, View, _Pen, draw_background, draw_robot

COLOURS = {
    "red": (214, 40, 40), "orange": (245, 130, 20), "yellow": (250, 210, 40), "green": (60, 170, 60),
    "blue": (40, 90, 220), "purple": (130, 60, 180), "pink": (245, 140, 190), "white": (240, 240, 240),
    "black": (35, 35, 40), "grey": (140, 140, 150), "brown": (130, 80, 40), "teal": (27, 163, 156),
}
ROBOT_COLOURS = tuple(c for c in COLOURS if c != "teal")       # the subject's body colour stays unseen
CLASSES = ("robot", "mug", "ball", "car")
# robots are the varied class the demo is about: they get as many scenes as the three others together
CLASS_WEIGHTS = (0.5, 1 / 6, 1 / 6, 1 / 6)
# background kind (make_sample_subject.draw_background) -> the words a caption uses for it
BACKGROUNDS = {"beach": "on the beach", "snow": "in the snow", "meadow": "on the grass",
               "table": "on a table", "night": "at night"}
SIZES = {"small": (0.42, 0.55), "big": (0.8, 0.95)}
POSITIONS = {"left": 0.3, "centre": 0.5, "right": 0.7}


@dataclass(frozen=True)
class Scene:
    cls: str
    colour: str
    background: str
    size: str
    position: str
    seed: int

    def caption(self, rng: np.random.Generator) -> str:
        """A caption that names the class and, each with some probability, colour, size,
        position and background, in a few phrasings."""
        words = [self.size] if rng.random() < 0.3 else []
        if rng.random() < 0.8:
            words.append(self.colour)
        noun = " ".join(words + [self.cls])
        article = "an" if noun[0] in "aeiou" else "a"
        text = f"{rng.choice(['a photo of ', 'a picture of ', ''])}{article} {noun}"
        if rng.random() < 0.8:
            text += " " + BACKGROUNDS[self.background]
        if rng.random() < 0.25:
            text += f", on the {self.position}" if self.position != "centre" else ", in the centre"
        return text


def sample_scene(rng: np.random.Generator, seed: int) -> Scene:
    cls = str(rng.choice(CLASSES, p=CLASS_WEIGHTS))
    colours = ROBOT_COLOURS if cls == "robot" else tuple(COLOURS)
    return Scene(cls, str(rng.choice(colours)), str(rng.choice(list(BACKGROUNDS))), str(rng.choice(list(SIZES))),
                 str(rng.choice(list(POSITIONS))), seed)


def _shade(rgb, f):
    return tuple(int(min(255, c * f)) for c in rgb)


def robot_style(colour: str, rng: np.random.Generator) -> RobotStyle:
    """A world robot: body of `colour`, the other parts random, never the subject's chest heart."""
    body = COLOURS[colour]
    parts = [c for c in COLOURS.values() if c != body]
    pick = lambda: parts[int(rng.integers(len(parts)))]  # noqa: E731
    visor = (30, 30, 36) if rng.random() < 0.6 else pick()
    ears = pick()
    return RobotStyle(body=body, body_side=_shade(body, 0.68), visor=visor, eyes=pick(), ears_feet=ears,
                      feet_side=_shade(ears, 0.75), antenna=pick() if rng.random() < 0.6 else None,
                      chest=pick() if rng.random() < 0.5 else None, heart=None,
                      limbs=(150, 156, 168) if rng.random() < 0.7 else pick(), neck_side=(120, 126, 138),
                      legs=DARK, round_head=bool(rng.random() < 0.5))


def _draw_mug(pen: _Pen, colour, rng):
    side = _shade(colour, 0.7)
    pen.d.ellipse([*pen.pt(-62, 8), *pen.pt(62, -6)], fill=(0, 0, 0, 60))
    x0, y0 = pen.pt(42, 78)
    x1, y1 = pen.pt(80, 18)
    pen.d.ellipse([x0, y0, x1, y1], outline=colour, width=max(1, int(12 * pen.u)))   # handle
    pen.box(-45, 45, 0, 105, 20, colour, side, 12)
    (ox, oy), r = pen.pt(0, 105, 20), 45 * pen.u * abs(pen.cos)
    pen.d.ellipse([ox - r, oy - 11 * pen.u, ox + r, oy + 11 * pen.u], fill=_shade(colour, 0.45))  # the opening
    if rng.random() < 0.5:                                                              # a band
        pen.box(-45, 45, 40, 55, 20.5, _shade(colour, 1.35), radius=2)


def _draw_ball(pen: _Pen, colour, rng):
    pen.d.ellipse([*pen.pt(-55, 8), *pen.pt(55, -6)], fill=(0, 0, 0, 60))
    pen.disc(0, 55, 0, 55, colour)
    stripe = _shade(colour, 0.6) if rng.random() < 0.5 else (245, 245, 245)
    x0, y0 = pen.pt(-55, 62)
    x1, y1 = pen.pt(55, 48)
    pen.d.chord([x0, y0 - 40 * pen.u, x1, y1 + 40 * pen.u], 20, 160, fill=stripe)
    pen.disc(-20, 80, 0, 12, _shade(colour, 1.5))                                       # highlight


def _draw_car(pen: _Pen, colour, rng):
    side = _shade(colour, 0.7)
    pen.d.ellipse([*pen.pt(-105, 8), *pen.pt(105, -6)], fill=(0, 0, 0, 60))
    pen.box(-100, 100, 18, 62, 30, colour, side, 10)                                    # body
    cabin = [pen.pt(-60, 60), pen.pt(-38, 100), pen.pt(42, 100), pen.pt(66, 60)]
    pen.d.polygon(cabin, fill=colour)
    window = (170, 215, 245)
    pen.d.polygon([pen.pt(-50, 62), pen.pt(-34, 93), pen.pt(-4, 93), pen.pt(-4, 62)], fill=window)
    pen.d.polygon([pen.pt(4, 62), pen.pt(4, 93), pen.pt(38, 93), pen.pt(56, 62)], fill=window)
    for wx in (-58, 58):
        pen.disc(wx, 18, 31, 19, (30, 30, 34))
        pen.disc(wx, 18, 32, 8, (190, 190, 200))
    pen.disc(95, 48, 31, 6, (255, 240, 160))                                            # headlight


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a size x size RGB image."""
    rng = np.random.default_rng([scene.seed, 1])
    big = (size * SUPERSAMPLE, size * SUPERSAMPLE)
    img = draw_background(scene.background, big, rng).convert("RGBA")
    layer = Image.new("RGBA", big, (0, 0, 0, 0))
    lo, hi = SIZES[scene.size]
    scale = float(rng.uniform(lo, hi))
    cx = POSITIONS[scene.position] + float(rng.uniform(-0.05, 0.05))
    ground = float(rng.uniform(0.86, 0.95))
    if scene.cls == "robot":
        arms = tuple(float(a) for a in rng.choice([10, 20, 60, 120, 150], 2))
        view = View("world", scene.background, float(rng.uniform(-0.9, 0.9)), scale * 0.95, cx, ground, 0.0, arms)
        draw_robot(layer, view, robot_style(scene.colour, rng))
    else:
        # the other objects are drawn at ~half the robot's height, so they are scaled up a little
        factor = {"mug": 1.25, "ball": 1.35, "car": 0.95}[scene.cls]
        unit = scale * factor * big[0] / 256.0
        pen = _Pen(ImageDraw.Draw(layer), cx * big[0], ground * big[1], unit, float(rng.uniform(-0.6, 0.6)))
        {"mug": _draw_mug, "ball": _draw_ball, "car": _draw_car}[scene.cls](pen, COLOURS[scene.colour], rng)
    img = Image.alpha_composite(img, layer).convert("RGB")
    return img.resize((size, size), Image.LANCZOS)


def scenes(count: int, seed: int = 0, start: int = 0):
    """Scenes start .. start+count-1 of `seed` with their captions: [(Scene, caption)]."""
    out = []
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, seed * 1_000_003 + i)
        out.append((scene, scene.caption(rng)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for the PNGs and metadata.jsonl (created if missing)")
    p.add_argument("--count", type=int, default=1000, help="number of scenes (default %(default)s)")
    p.add_argument("--size", type=int, default=64, help="side of each image in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metadata.jsonl and images")
    args = p.parse_args(argv)
    meta = os.path.join(args.output, "metadata.jsonl")
    if os.path.exists(meta) and not args.overwrite:
        print(f"error: {meta} already exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    if args.count < 1 or args.size < 16:
        print("error: --count must be at least 1 and --size at least 16", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    with open(meta, "w") as f:
        for i, (scene, text) in enumerate(scenes(args.count, args.seed)):
            name = f"{i:05d}.png"
            render(scene, args.size).save(os.path.join(args.output, name))
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    print(f"wrote {args.count} scenes to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
