"""The built-in demo set: procedural multi-label images, generated in seconds.

Each class is a coloured shape (up to 20 classes). An image carries 2 or 3 classes by
default, or any count or range given by ``labels`` ("K" or "MIN-MAX", at most 9; e.g.
20 classes with 4-6 labels for a dense set like COCO's busier images): the count is drawn
uniformly from the range, the first class from a skewed prior, the others mostly from the
previous class's two "friends", so labels co-occur (as sky and cloud do) and the label kNN
graph has structure. Shapes sit one per cell: a 2 x 2 grid when no image has more than 4
labels, else 3 x 3 with smaller shapes. Everything is fixed by the seed: the same seed
gives the same bytes (and the default 2-3 labels give the bytes earlier versions gave).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from retdmctl.config import DEMO_MAX_LABELS, demo_label_range
from retdmctl.data.ingest import Record, SourceData
from retdmctl.errors import InputError

CLASSES = (
    "circle", "square", "triangle", "cross", "ring", "star",
    "diamond", "hexagon", "bar", "crescent", "arrow", "dots",
    "pentagon", "frame", "half_disc", "chevron", "zigzag", "oval", "outline_triangle", "hatch",
)  # fmt: skip
_HUES = (0, 30, 55, 120, 180, 210, 250, 285, 320, 15, 160, 95, 45, 75, 140, 195, 230, 270, 300, 340)


def _cooccurrence(num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    prior = rng.dirichlet(np.full(num_classes, 2.0))
    friends = np.full((num_classes, num_classes), 0.15 / num_classes)
    for c in range(num_classes):
        a, b = (c + 1) % num_classes, (c + 3) % num_classes
        friends[c, a] += 0.5
        friends[c, b] += 0.35
        friends[c, c] = 0.0
    return prior, friends / friends.sum(axis=1, keepdims=True)


def sample_labels(num_images: int, num_classes: int, seed: int, per_image: tuple[int, int] = (2, 3)) -> np.ndarray:
    """(num_images, num_classes) uint8: each row has between per_image[0] and
    per_image[1] ones (the count uniform in that range)."""
    lo, hi = per_image
    rng = np.random.default_rng([seed, 7])
    prior, friends = _cooccurrence(num_classes, rng)
    labels = np.zeros((num_images, num_classes), dtype=np.uint8)
    for i in range(num_images):
        first = rng.choice(num_classes, p=prior)
        chosen = [first]
        for _ in range(rng.integers(lo - 1, hi)):  # lo-1 .. hi-1 more (default: 1 or 2)
            p = friends[chosen[-1]].copy()
            p[chosen] = 0
            chosen.append(rng.choice(num_classes, p=p / p.sum()))
        labels[i, chosen] = 1
    return labels


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    img = Image.new("HSV", (1, 1), (int(hue / 360 * 255) % 256, int(sat * 255), int(val * 255)))
    return img.convert("RGB").getpixel((0, 0))


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list:
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        rad = r if (inner is None or k % 2 == 0) else r * inner
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _turn(cx: float, cy: float, rot: float, pts: list) -> list:
    """Points given relative to (cx, cy), rotated by rot and moved there."""
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, cls: int, cx: float, cy: float, r: float, rot: float, color) -> None:
    name = CLASSES[cls]
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(2, int(r / 3))
    if name == "circle":
        draw.ellipse(box, fill=color)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot + math.pi / 4), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot - math.pi / 2), fill=color)
    elif name == "cross":
        draw.line(_polygon(cx, cy, r, 2, rot), fill=color, width=w)
        draw.line(_polygon(cx, cy, r, 2, rot + math.pi / 2), fill=color, width=w)
    elif name == "ring":
        draw.ellipse(box, outline=color, width=w)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=color)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)], fill=color)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=color)
    elif name == "bar":
        for k in (-1, 0, 1):
            draw.line([(cx - r, cy + k * r * 0.6), (cx + r, cy + k * r * 0.6)], fill=color, width=max(2, w // 2))
    elif name == "crescent":
        start = math.degrees(rot)
        draw.arc(box, start, start + 160, fill=color, width=int(w * 1.6))
    elif name == "arrow":
        draw.line([(cx - r, cy), (cx + r * 0.4, cy)], fill=color, width=w)
        draw.polygon([(cx + r, cy), (cx + r * 0.3, cy - r * 0.6), (cx + r * 0.3, cy + r * 0.6)], fill=color)
    elif name == "dots":
        for dx in (-0.6, 0.6):
            for dy in (-0.6, 0.6):
                d = r * 0.3
                draw.ellipse((cx + dx * r - d, cy + dy * r - d, cx + dx * r + d, cy + dy * r + d), fill=color)
    elif name == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, rot), fill=color)
    elif name == "frame":
        pts = _polygon(cx, cy, r, 4, rot + math.pi / 4)
        draw.line(pts + pts[:2], fill=color, width=w, joint="curve")
    elif name == "half_disc":
        start = math.degrees(rot)
        draw.pieslice(box, start, start + 180, fill=color)
    elif name == "chevron":
        draw.line(_turn(cx, cy, rot, [(-r, -0.5 * r), (0, 0.5 * r), (r, -0.5 * r)]), fill=color, width=w, joint="curve")
    elif name == "zigzag":
        pts = [(-r + k * r / 2, (-0.4 if k % 2 else 0.4) * r) for k in range(5)]
        draw.line(_turn(cx, cy, rot, pts), fill=color, width=max(2, int(w * 0.7)), joint="curve")
    elif name == "oval":
        draw.polygon(_turn(cx, cy, rot, [(r * math.cos(a), 0.45 * r * math.sin(a))
                                          for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]), fill=color)
    elif name == "outline_triangle":
        pts = _polygon(cx, cy, r, 3, rot - math.pi / 2)
        draw.line(pts + pts[:2], fill=color, width=w, joint="curve")
    elif name == "hatch":
        for k in (-1, 0, 1):
            for seg in ([(-r, k * r * 0.6), (r, k * r * 0.6)], [(k * r * 0.6, -r), (k * r * 0.6, r)]):
                draw.line(_turn(cx, cy, rot, seg), fill=color, width=max(2, w // 3))


@dataclass(frozen=True)
class DemoImage:
    """One procedural image; picklable, so worker processes render it."""

    index: int
    seed: int
    classes: tuple[int, ...]
    grid: int = 2  # cells per side: 2 (up to 4 shapes, the default sets) or 3 (up to 9)

    def render(self) -> Image.Image:
        rng = np.random.default_rng([self.seed, self.index])
        w, h = (int(v) for v in rng.integers(96, 129, size=2))
        base = rng.uniform(0, 360)
        top, bottom = _rgb(base, 0.25, 0.35), _rgb(base + 40, 0.3, 0.6)
        grad = np.linspace(0, 1, h)[:, None, None]
        bg = (1 - grad) * np.array(top) + grad * np.array(bottom)
        bg = bg + rng.normal(0, 12, size=(h, w, 3))
        img = Image.fromarray(np.clip(np.broadcast_to(bg, (h, w, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        g = self.grid
        cells = rng.permutation(g * g)  # one cell per object keeps occlusion small
        for cell, cls in zip(cells, self.classes):
            cx = (0.5 + cell % g) / g * w + rng.uniform(-0.16, 0.16) / g * w
            cy = (0.5 + cell // g) / g * h + rng.uniform(-0.16, 0.16) / g * h
            r = rng.uniform(0.32, 0.48) / g * min(w, h)
            hue = _HUES[cls % len(_HUES)] + rng.uniform(-12, 12)
            color = _rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
            _draw_shape(draw, cls, cx, cy, r, rng.uniform(0, 2 * math.pi), color)
        return img.filter(ImageFilter.GaussianBlur(0.6))


def read_demo(num_images: int, num_classes: int, seed: int, labels_per_image: str = "2-3") -> SourceData:
    if not 2 <= num_classes <= len(CLASSES):
        raise InputError(f"demo: --classes must be between 2 and {len(CLASSES)}, got {num_classes}")
    if num_images < 10:
        raise InputError(f"demo: --images must be at least 10, got {num_images}")
    per_image = demo_label_range(labels_per_image)
    if per_image is None:
        raise InputError(
            f"demo: --labels must be K or MIN-MAX with 1 <= MIN <= MAX <= {DEMO_MAX_LABELS}, got {labels_per_image!r}")
    if per_image[1] > num_classes:
        raise InputError(f"demo: --labels {labels_per_image} needs at least {per_image[1]} classes, got --classes {num_classes}")
    labels = sample_labels(num_images, num_classes, seed, per_image)
    grid = 2 if per_image[1] <= 4 else 3
    records = [
        Record(
            key=f"demo/{i:06d}",
            labels=labels[i],
            source=DemoImage(i, seed, tuple(int(c) for c in np.flatnonzero(labels[i])), grid),
        )
        for i in range(num_images)
    ]
    return SourceData(name="demo", class_names=list(CLASSES[:num_classes]), records=records)
