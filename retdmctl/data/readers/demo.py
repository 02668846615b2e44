"""The built-in demo set: procedural multi-label images, generated in seconds.

Each class is a coloured shape. An image carries 2 or 3 classes: the first is drawn from a
skewed prior, the others mostly from that class's two "friends", so labels co-occur
(as sky and cloud do) and the label kNN graph has structure. Everything is fixed by the
seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from retdmctl.data.ingest import Record, SourceData
from retdmctl.errors import InputError

CLASSES = (
    "circle", "square", "triangle", "cross", "ring", "star",
    "diamond", "hexagon", "bar", "crescent", "arrow", "dots",
)  # fmt: skip
_HUES = (0, 30, 55, 120, 180, 210, 250, 285, 320, 15, 160, 95)


def _cooccurrence(num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    prior = rng.dirichlet(np.full(num_classes, 2.0))
    friends = np.full((num_classes, num_classes), 0.15 / num_classes)
    for c in range(num_classes):
        a, b = (c + 1) % num_classes, (c + 3) % num_classes
        friends[c, a] += 0.5
        friends[c, b] += 0.35
        friends[c, c] = 0.0
    return prior, friends / friends.sum(axis=1, keepdims=True)


def sample_labels(num_images: int, num_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    prior, friends = _cooccurrence(num_classes, rng)
    labels = np.zeros((num_images, num_classes), dtype=np.uint8)
    for i in range(num_images):
        first = rng.choice(num_classes, p=prior)
        chosen = [first]
        for _ in range(rng.integers(1, 3)):  # 1 or 2 more: 2-3 labels per image
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


@dataclass(frozen=True)
class DemoImage:
    """One procedural image; picklable, so worker processes render it."""

    index: int
    seed: int
    classes: tuple[int, ...]

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
        cells = rng.permutation(4)  # one quadrant per object keeps occlusion small
        for cell, cls in zip(cells, self.classes):
            cx = (0.25 + 0.5 * (cell % 2)) * w + rng.uniform(-0.08, 0.08) * w
            cy = (0.25 + 0.5 * (cell // 2)) * h + rng.uniform(-0.08, 0.08) * h
            r = rng.uniform(0.16, 0.24) * min(w, h)
            hue = _HUES[cls % len(_HUES)] + rng.uniform(-12, 12)
            color = _rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
            _draw_shape(draw, cls, cx, cy, r, rng.uniform(0, 2 * math.pi), color)
        return img.filter(ImageFilter.GaussianBlur(0.6))


def read_demo(num_images: int, num_classes: int, seed: int) -> SourceData:
    if not 2 <= num_classes <= len(CLASSES):
        raise InputError(f"demo: --classes must be between 2 and {len(CLASSES)}, got {num_classes}")
    if num_images < 10:
        raise InputError(f"demo: --images must be at least 10, got {num_images}")
    labels = sample_labels(num_images, num_classes, seed)
    records = [
        Record(
            key=f"demo/{i:06d}",
            labels=labels[i],
            source=DemoImage(i, seed, tuple(int(c) for c in np.flatnonzero(labels[i]))),
        )
        for i in range(num_images)
    ]
    return SourceData(name="demo", class_names=list(CLASSES[:num_classes]), records=records)
