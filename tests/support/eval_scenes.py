"""A second generator of the demo task's pictures and questions, for evaluation only (issue 21): written apart
from convllava_edge/shapes_task.py, which the demo is trained on, with its own drawing, colours and placement.

- Drawing: each shape is a boolean mask computed with numpy on a 4x supersampled grid (a disc by distance, a
  square by bounds, a triangle by three half-planes), averaged down, then alpha-blended over the canvas in
  drawing order; no PIL drawing primitive is used.
- Colours: shades picked in RGB around fixed anchors (red (205, 35, 40), green (40, 160, 60), blue (40, 80, 210),
  yellow (225, 200, 40)), each channel moved by up to 25; canvases from near-white to near-black, grey or tinted.
- Placement: canvases 160-400 px a side with aspect ratios from 1:2 to 2:1; shapes 10-45% of the shorter side;
  centres uniform, away from the vertical middle by at least 8% of the width (so left/right is defined) and at
  least 6% of the shorter side from the canvas edge; shapes may touch or overlap as long as every shape keeps
  at least two thirds of its own pixels visible. ``layout`` says whether any two touch or overlap.
- Questions: the five forms, worded as the task words them (count, color of a unique kind, shape of a unique
  colour, exists yes/no, side), answers as single words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

KINDS = ("circle", "square", "triangle")
ANCHORS = {"red": (205, 35, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (225, 200, 40)}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Item:
    kind: str
    color: str
    x: float  # centre, pixels
    y: float
    radius: float  # half the side of its bounding square
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Picture:
    image: Image.Image
    items: tuple[Item, ...]
    layout: str  # "apart" or "touching" (any two shapes touch or overlap)


def _mask(item: Item, width: int, height: int) -> np.ndarray:
    s = SUPERSAMPLE
    ys, xs = np.mgrid[0:height * s, 0:width * s]
    x, y = (xs + 0.5) / s, (ys + 0.5) / s
    dx, dy, r = x - item.x, y - item.y, item.radius
    if item.kind == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif item.kind == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # apex up, base at the bottom of the bounding square
        inside = (dy <= r) & (2 * dx <= dy + r) & (-2 * dx <= dy + r)
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def _canvas(rng: np.random.Generator) -> tuple[int, int, int]:
    level = rng.uniform(15, 250)
    tint = rng.uniform(-12, 12, size=3) if rng.random() < 0.5 else np.zeros(3)
    return tuple(int(np.clip(level + t, 0, 255)) for t in tint)


def _shade(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in ANCHORS[color])


def picture(rng: np.random.Generator, n: int | None = None, touching: bool | None = None) -> Picture:
    """A scene of 1-3 shapes (``n``); ``touching``: True asks for two that touch or overlap, False for none."""
    for _ in range(2000):
        short = int(rng.integers(160, 401))
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        width, height = (int(round(short * ratio)), short) if ratio >= 1 else (short, int(round(short / ratio)))
        if max(width, height) > 400:
            continue
        count = n or int(rng.integers(1, 4))
        pairs = [(k, c) for k in KINDS for c in ANCHORS]
        chosen = [pairs[i] for i in rng.choice(len(pairs), size=count, replace=False)]
        items = []
        for kind, color in chosen:
            radius = rng.uniform(0.10, 0.45) * min(width, height) / 2
            margin = 0.06 * min(width, height)
            lo_x, hi_x = radius + margin, width - radius - margin
            lo_y, hi_y = radius + margin, height - radius - margin
            if lo_x >= hi_x or lo_y >= hi_y:
                break
            x = rng.uniform(lo_x, hi_x)
            if abs(x - width / 2) < 0.08 * width:
                break
            items.append(Item(kind, color, x, rng.uniform(lo_y, hi_y), radius, _shade(rng, color)))
        if len(items) != count:
            continue
        masks = [_mask(i, width, height) for i in items]
        if any(m.sum() < 30 for m in masks):  # too small to see at this size
            continue
        # what each shape keeps visible under the ones drawn after it
        visible_ok, close = True, False
        for i, m in enumerate(masks):
            covered = np.zeros_like(m)
            for later in masks[i + 1:]:
                covered = np.maximum(covered, later)
            if (m * (1 - covered)).sum() < (2 / 3) * m.sum():
                visible_ok = False
            for other in masks[i + 1:]:
                grown = np.zeros_like(other, dtype=bool)
                solid = other > 0
                grown[1:, :] |= solid[:-1, :]
                grown[:-1, :] |= solid[1:, :]
                grown[:, 1:] |= solid[:, :-1]
                grown[:, :-1] |= solid[:, 1:]
                if ((m > 0) & (grown | solid)).any():
                    close = True
        if not visible_ok or (touching is not None and close != touching):
            continue
        canvas = np.empty((height, width, 3), np.float32)
        canvas[:] = _canvas(rng)
        if any(np.abs(np.asarray(i.rgb, np.float32) - canvas[0, 0]).sum() < 90 for i in items):
            continue  # a shape the colour of its canvas
        for item, m in zip(items, masks):
            canvas = canvas * (1 - m[..., None]) + np.asarray(item.rgb, np.float32) * m[..., None]
        image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
        return Picture(image, tuple(items), "touching" if close else "apart")
    raise RuntimeError("no layout found")


def side(item: Item, width: int) -> str:
    return "left" if item.x < width / 2 else "right"


def questions(pic: Picture, rng: np.random.Generator) -> dict[str, list[tuple[str, str]]]:
    """Form -> [(question, answer)] for every question the scene allows (exists: each present pair and as many
    absent ones)."""
    items, width = pic.items, pic.image.width
    kinds, colors = [i.kind for i in items], [i.color for i in items]
    out: dict[str, list[tuple[str, str]]] = {"count": [("How many shapes are there?", str(len(items)))],
                                              "color": [], "shape": [], "exists": [], "side": []}
    for i in items:
        if kinds.count(i.kind) == 1:
            out["color"].append((f"What color is the {i.kind}?", i.color))
        if colors.count(i.color) == 1:
            out["shape"].append((f"What shape is the {i.color} one?", i.kind))
        out["exists"].append((f"Is there a {i.color} {i.kind}?", "yes"))
        out["side"].append((f"Is the {i.color} {i.kind} on the left or the right?", side(i, width)))
    absent = [(k, c) for k in KINDS for c in ANCHORS if (k, c) not in {(i.kind, i.color) for i in items}]
    for j in rng.choice(len(absent), size=len(items), replace=False):
        k, c = absent[int(j)]
        out["exists"].append((f"Is there a {c} {k}?", "no"))
    return out


FORMS = ("count", "color", "shape", "exists", "side")


def conversations(seed: int, n_per_form: int, turn: int, touching_share: float = 0.3):
    """(picture, [earlier questions], (question, answer, form)) with ``n_per_form`` per form: the asked question
    at ``turn`` (1-3), the earlier turns other questions about the same picture (the first: the count)."""
    rng = np.random.default_rng(seed)
    for k in range(n_per_form * len(FORMS)):
        form = FORMS[k % len(FORMS)]
        while True:
            pic = picture(rng, touching=bool(rng.random() < touching_share))
            qs = questions(pic, rng)
            if not qs[form]:
                continue
            asked = qs[form][int(rng.integers(0, len(qs[form])))]
            count = qs["count"][0][0]
            pool = [q for f in FORMS for q, _ in qs[f] if q not in (asked[0], count)]
            earlier = ([count] if form != "count" else []) + [pool[int(i)] for i in rng.permutation(len(pool))]
            if len(earlier) >= turn - 1:
                yield pic, earlier[:turn - 1], (asked[0], asked[1], form)
                break
