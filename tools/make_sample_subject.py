#!/usr/bin/env python
"""Draw a small procedural DreamBooth sample subject: a cartoon robot in five views.

The robot has a fixed, distinctive look (teal boxy body, navy visor with orange eyes, orange ears
and feet, magenta antenna ball, yellow chest panel with a magenta heart) so a fine-tune has a
consistent subject to learn. The five images vary viewpoint (a fake 3-D yaw), pose, scale and
background. Everything is drawn with PIL from a fixed seed: no third-party photos.

    python tools/make_sample_subject.py --output assets/sample_subject [--size 256] [--overwrite]

Self-contained (PIL + numpy) so it runs without the repository on sys.path.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # draw large, then downsample: cheap antialiasing

TEAL, TEAL_SIDE = (27, 163, 156), (16, 112, 108)
NAVY, ORANGE, MAGENTA = (29, 43, 83), (255, 140, 26), (222, 38, 140)
YELLOW, GREY, DARK = (255, 210, 63), (150, 156, 168), (70, 74, 86)


@dataclass(frozen=True)
class RobotStyle:
    """Colours and parts of a cartoon robot; the defaults are the sample subject. The synthetic
    world (tools/synthetic_world.py) draws other robots with the same code and other styles."""
    body: tuple = TEAL
    body_side: tuple = TEAL_SIDE
    visor: tuple = NAVY
    eyes: tuple = ORANGE
    ears_feet: tuple = ORANGE
    feet_side: tuple = (200, 100, 10)
    antenna: tuple | None = MAGENTA     # the ball on top; None: no antenna
    chest: tuple | None = YELLOW        # chest panel; None: none
    heart: tuple | None = MAGENTA       # heart on the chest panel; None: none
    limbs: tuple = GREY
    neck_side: tuple = (120, 126, 138)
    legs: tuple = DARK
    round_head: bool = False


SUBJECT = RobotStyle()


@dataclass(frozen=True)
class View:
    name: str
    background: str
    yaw: float      # radians; > 0 turns the robot's front toward the viewer's right
    scale: float    # 1.0 = full body filling most of the frame
    cx: float       # robot centre, fraction of the width
    ground: float   # feet line, fraction of the height (> 1 puts the feet below the frame)
    tilt: float     # degrees, counter-clockwise
    arms: tuple[float, float]  # (left, right) arm angles in degrees from hanging down


VIEWS = (
    View("front", "studio", 0.0, 1.0, 0.50, 0.92, 0.0, (10, 10)),
    View("wave", "meadow", 0.55, 0.92, 0.45, 0.93, 0.0, (15, 150)),
    View("side", "table", -0.95, 0.85, 0.55, 0.90, 0.0, (25, -20)),
    View("closeup", "dots", 0.25, 1.75, 0.50, 1.50, 0.0, (20, 20)),
    View("far", "night", -0.35, 0.48, 0.66, 0.80, 9.0, (120, 120)),
)


class _Pen:
    """Maps robot units (1 unit ~ 1 px of a 256 px image at scale 1) onto a supersampled canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, ground: float, unit: float, yaw: float):
        self.d, self.cx, self.ground, self.u = draw, cx, ground, unit
        self.cos, self.sin = math.cos(yaw), math.sin(yaw)

    def pt(self, x: float, y: float, z: float = 0.0) -> tuple[float, float]:
        """Project a body point (x right, y up from the feet, z toward the viewer) to the canvas."""
        return self.cx + (x * self.cos + z * self.sin) * self.u, self.ground - y * self.u

    def box(self, x0, x1, y0, y1, depth, front, side=None, radius=6.0):
        """A box of the given depth: the side face that the yaw reveals, then the rounded front face.
        With side=None only the front face is drawn (a flat panel sitting at z=depth)."""
        if side is not None and abs(self.sin) > 0.05:
            sx = x0 if self.sin > 0 else x1  # the revealed side is opposite to where the face moves
            quad = [self.pt(sx, y0, depth), self.pt(sx, y1, depth), self.pt(sx, y1, -depth), self.pt(sx, y0, -depth)]
            self.d.polygon(quad, fill=side)
        (ax, ay), (bx, by) = self.pt(x0, y1, depth), self.pt(x1, y0, depth)
        self.d.rounded_rectangle([min(ax, bx), ay, max(ax, bx), by], radius=radius * self.u, fill=front)

    def disc(self, x, y, z, r, fill, squash=1.0):
        px, py = self.pt(x, y, z)
        rx, ry = r * self.u * squash, r * self.u
        self.d.ellipse([px - rx, py - ry, px + rx, py + ry], fill=fill)

    def limb(self, x, y, z, angle_deg, length, width, fill, end_fill, end_r):
        """An arm from the shoulder at (x, y, z), swung sideways (outward) by angle_deg."""
        a = math.radians(angle_deg) * (1 if x > 0 else -1)
        ex, ey = x + length * math.sin(a), y - length * math.cos(a)
        self.d.line([self.pt(x, y, z), self.pt(ex, ey, z)], fill=fill, width=max(1, int(width * self.u)))
        self.disc(ex, ey, z, end_r, end_fill)


def draw_robot(layer: Image.Image, view: View, style: RobotStyle = SUBJECT) -> None:
    """Draw the robot for `view` onto a transparent RGBA layer."""
    w, h = layer.size
    unit = view.scale * w / 256.0
    pen = _Pen(ImageDraw.Draw(layer), view.cx * w, view.ground * h, unit, view.yaw)
    near = 1 if view.yaw <= 0 else -1  # the side of the body closer to the viewer (x sign)
    squash = max(0.35, abs(pen.cos))

    # ground shadow
    sx, sy = pen.pt(0, 0)
    pen.d.ellipse([sx - 52 * unit, sy - 7 * unit, sx + 52 * unit, sy + 7 * unit], fill=(0, 0, 0, 60))

    # far arm behind the body, legs and feet
    far_arm = (-near, view.arms[0] if -near < 0 else view.arms[1])
    pen.limb(far_arm[0] * 40, 100, 0, far_arm[1], 52, 12, style.limbs, style.ears_feet, 10)
    for side in (-1, 1):
        pen.box(side * 26 - 7, side * 26 + 7, 12, 42, 8, style.legs, style.legs, 3)
        pen.box(side * 26 - 13, side * 26 + 13, 0, 14, 14, style.ears_feet, style.feet_side, 5)

    # body with chest panel and heart
    pen.box(-40, 40, 38, 112, 26, style.body, style.body_side, 10)
    if style.chest is not None:
        pen.box(-24, 24, 56, 96, 26.5, style.chest, radius=5)
    if style.heart is not None:
        for hx in (-6, 6):
            pen.disc(hx, 80, 27, 7, style.heart, squash)
        hx0, hy0 = pen.pt(-12.5, 78, 27)
        hx1, _ = pen.pt(12.5, 78, 27)
        _, hy1 = pen.pt(0, 63, 27)
        pen.d.polygon([(hx0, hy0), (hx1, hy0), ((hx0 + hx1) / 2, hy1)], fill=style.heart)

    # neck, far ear, head, visor, eyes, smile, near ear, antenna
    pen.box(-10, 10, 110, 122, 10, style.limbs, style.neck_side, 2)
    pen.disc(-near * 47, 150, 0, 11, style.ears_feet, 0.6)
    pen.box(-46, 46, 118, 184, 30, style.body, style.body_side, 33 if style.round_head else 14)
    pen.box(-36, 36, 130, 172, 30.5, style.visor, radius=21 if style.round_head else 10)
    for ex in (-16, 16):
        pen.disc(ex, 154, 31, 9, style.eyes, squash)
        pen.disc(ex + 3, 157, 31, 3, (255, 240, 210), squash)
    (mx0, my0), (mx1, _) = pen.pt(-10, 143, 31), pen.pt(10, 143, 31)
    pen.d.arc([mx0, my0 - 6 * unit, mx1, my0 + 4 * unit], 20, 160, fill=(90, 220, 230), width=max(1, int(3 * unit)))
    pen.disc(near * 47, 150, 0, 11, style.ears_feet, 0.6)
    if style.antenna is not None:
        pen.d.line([pen.pt(0, 184), pen.pt(0, 206)], fill=DARK, width=max(1, int(4 * unit)))
        pen.disc(0, 210, 0, 9, style.antenna)

    # near arm in front of the body
    near_angle = view.arms[0] if near < 0 else view.arms[1]
    pen.limb(near * 40, 100, 0, near_angle, 52, 12, style.limbs, style.ears_feet, 10)


def _gradient(size: tuple[int, int], top, bottom) -> Image.Image:
    t = np.linspace(0.0, 1.0, size[1])[:, None, None]
    rows = (1 - t) * np.array(top, float) + t * np.array(bottom, float)
    return Image.fromarray(np.broadcast_to(rows, (size[1], size[0], 3)).round().astype(np.uint8), "RGB")


def draw_background(kind: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One of seven simple scenes, with seeded details (the sample subject uses five; the synthetic
    world adds the beach and the snow)."""
    w, h = size
    if kind == "studio":
        img = _gradient(size, (170, 205, 235), (235, 242, 250))
        ImageDraw.Draw(img).rectangle([0, int(h * 0.78), w, h], fill=(214, 218, 224))
    elif kind == "meadow":
        img = _gradient(size, (120, 180, 240), (200, 228, 250))
        d = ImageDraw.Draw(img)
        for _ in range(3):  # clouds
            x, y = rng.uniform(0.05, 0.95) * w, rng.uniform(0.08, 0.35) * h
            for dx in (-0.06, 0, 0.06):
                r = rng.uniform(0.04, 0.07) * w
                d.ellipse([x + dx * w - r, y - r * 0.7, x + dx * w + r, y + r * 0.7], fill=(250, 250, 252))
        d.rectangle([0, int(h * 0.72), w, h], fill=(96, 170, 72))
        for _ in range(60):  # grass tufts
            x, y = rng.uniform(0, w), rng.uniform(0.74, 1.0) * h
            d.line([(x, y), (x + rng.uniform(-6, 6) * w / 256, y - 6 * w / 256)], fill=(60, 130, 50), width=max(1, w // 256))
    elif kind == "table":
        img = Image.new("RGB", size, (238, 226, 200))
        d = ImageDraw.Draw(img)
        for x in range(0, w, w // 8):  # wallpaper stripes
            d.rectangle([x, 0, x + w // 32, int(h * 0.7)], fill=(226, 210, 180))
        d.rectangle([0, int(h * 0.7), w, h], fill=(150, 96, 56))
        for y in np.linspace(0.76, 0.96, 4):  # planks
            d.line([(0, y * h), (w, y * h)], fill=(120, 74, 42), width=max(1, w // 256))
    elif kind == "dots":
        img = Image.new("RGB", size, (250, 214, 226))
        d = ImageDraw.Draw(img)
        for _ in range(40):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.015, 0.03) * w
            d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 236, 244))
    elif kind == "night":
        img = _gradient(size, (24, 18, 60), (80, 48, 110))
        d = ImageDraw.Draw(img)
        for _ in range(70):  # stars
            x, y, r = rng.uniform(0, w), rng.uniform(0, 0.65) * h, rng.uniform(0.5, 1.5) * w / 256
            d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 250, 220))
        d.ellipse([w * 0.12, h * 0.1, w * 0.26, h * 0.24], fill=(250, 240, 200))  # moon
        d.rectangle([0, int(h * 0.74), w, h], fill=(46, 40, 70))
    elif kind == "beach":
        img = _gradient(size, (90, 170, 245), (190, 225, 250))
        d = ImageDraw.Draw(img)
        d.rectangle([0, int(h * 0.55), w, int(h * 0.7)], fill=(30, 110, 190))       # sea
        for _ in range(6):  # wave crests
            x, y = rng.uniform(0, w), rng.uniform(0.57, 0.68) * h
            d.line([(x, y), (x + 0.08 * w, y)], fill=(220, 240, 255), width=max(1, w // 128))
        d.rectangle([0, int(h * 0.7), w, h], fill=(238, 214, 150))                  # sand
        d.ellipse([w * 0.78, h * 0.06, w * 0.92, h * 0.2], fill=(255, 236, 120))     # sun
    elif kind == "snow":
        img = _gradient(size, (190, 205, 225), (235, 240, 248))
        d = ImageDraw.Draw(img)
        for x0 in (-0.2, 0.35):  # distant snowy hills
            d.ellipse([x0 * w, h * 0.55, (x0 + 0.9) * w, h * 1.0], fill=(246, 248, 252))
        d.rectangle([0, int(h * 0.74), w, h], fill=(250, 251, 255))
        for _ in range(50):  # falling flakes
            x, y, r = rng.uniform(0, w), rng.uniform(0, 0.74) * h, rng.uniform(0.006, 0.012) * w
            d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img


def render(view: View, size: int, seed: int) -> Image.Image:
    """One view as a size x size RGB image."""
    big = (size * SUPERSAMPLE, size * SUPERSAMPLE)
    rng = np.random.default_rng([seed, VIEWS.index(view)])
    img = draw_background(view.background, big, rng).convert("RGBA")
    layer = Image.new("RGBA", big, (0, 0, 0, 0))
    draw_robot(layer, view)
    if view.tilt:
        pivot = (view.cx * big[0], view.ground * big[1])
        layer = layer.rotate(view.tilt, resample=Image.BICUBIC, center=pivot)
    img = Image.alpha_composite(img, layer).convert("RGB")
    return img.resize((size, size), Image.LANCZOS)


def output_names() -> list[str]:
    return [f"robot_{i:02d}_{v.name}.png" for i, v in enumerate(VIEWS)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="assets/sample_subject",
                        help="folder to write the PNGs into (created if missing; default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="side of each square image in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the background details (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace images that already exist in --output")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error("--size must be at least 32")

    paths = [os.path.join(args.output, n) for n in output_names()]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        print(f"error: {existing[0]} already exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    for view, path in zip(VIEWS, paths):
        render(view, args.size, args.seed).save(path, optimize=True)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
