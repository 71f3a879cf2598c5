"""The demo model's task: pictures of one to three coloured shapes, and questions about them.

Fixed so anyone can test the shipped model independently (issue 5 states it):
- image W and H each in [192, 320] px, a plain light background (light grey, white or beige);
- 1-3 filled, non-overlapping shapes: circle, square (axis-aligned), triangle (isosceles, apex up);
- colours red/green/blue/yellow in varying shades: hue within 15 degrees of 0/120/240/60, saturation
  and value >= 0.7; size 20-40% of the shorter side; no shape-colour pair twice; no shape's centre
  within 10% of the width of the vertical centre line;
- five question forms with one-word answers (numbers as digits). An answer is right when the
  generated text, stripped, lower-cased and without a final period, equals the expected word.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "blue": 240.0}  # degrees
FORMS = ("count", "color", "shape", "exists", "side")
MIN_SIDE, MAX_SIDE = 192, 320


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side of the bounding square, pixels
    rgb: tuple[int, int, int]
    image_width: int

    @property
    def side(self) -> str:
        return "left" if self.cx < self.image_width / 2 else "right"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.width, self.height), self.background)
        draw = ImageDraw.Draw(image)
        for s in self.shapes:
            h = s.size / 2
            box = (s.cx - h, s.cy - h, s.cx + h, s.cy + h)
            if s.kind == "circle":
                draw.ellipse(box, fill=s.rgb)
            elif s.kind == "square":
                draw.rectangle(box, fill=s.rgb)
            else:
                draw.polygon([(s.cx, s.cy - h), (s.cx - h, s.cy + h), (s.cx + h, s.cy + h)], fill=s.rgb)
        return image


@dataclass(frozen=True)
class Question:
    form: str
    text: str
    answer: str
    about: Shape | None = None  # the one shape the question names (none for count, or a pair that is absent)


def _shade(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    hue = (HUES[color] + rng.uniform(-15, 15)) % 360
    r, g, b = colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    kind = rng.integers(0, 3)
    if kind == 0:  # light grey
        v = int(rng.integers(215, 241))
        return v, v, v
    if kind == 1:  # white
        v = int(rng.integers(245, 256))
        return v, v, v
    return int(rng.integers(235, 250)), int(rng.integers(222, 236)), int(rng.integers(190, 212))  # beige


def _place_shapes(rng: np.random.Generator, n: int, width: int, height: int, sizes: tuple[float, float],
                  gap: float | None) -> list[Shape] | None:
    """``n`` shapes (no shape-colour pair twice, sizes a fraction of the shorter side, no centre within 10% of the
    width of the middle), or None when this draw breaks a rule. ``gap``: pixels kept between bounding squares
    (None: shapes may touch and overlap)."""
    pairs: set[tuple[str, str]] = set()
    shapes: list[Shape] = []
    for _ in range(n):
        kind, color = str(rng.choice(SHAPES)), str(rng.choice(COLORS))
        while (kind, color) in pairs:
            kind, color = str(rng.choice(SHAPES)), str(rng.choice(COLORS))
        size = rng.uniform(*sizes) * min(width, height)
        half = size / 2
        cx, cy = rng.uniform(half, width - half), rng.uniform(half, height - half)
        if abs(cx - width / 2) < 0.1 * width:
            return None
        if gap is not None and any(abs(cx - o.cx) < (size + o.size) / 2 + gap
                                   and abs(cy - o.cy) < (size + o.size) / 2 + gap for o in shapes):
            return None
        pairs.add((kind, color))
        shapes.append(Shape(kind, color, cx, cy, size, _shade(rng, color), width))
    return shapes


def random_scene(rng: np.random.Generator, n_shapes: int | None = None) -> Scene:
    width, height = (int(rng.integers(MIN_SIDE, MAX_SIDE + 1)) for _ in range(2))
    n = int(n_shapes or rng.integers(1, 4))
    for _ in range(1000):  # rejection sampling: a layout with n shapes almost always fits quickly
        # 2 px between bounding squares; every shape lies inside its square
        shapes = _place_shapes(rng, n, width, height, (0.2, 0.4), gap=2.0)
        if shapes is not None:
            return Scene(width, height, _background(rng), tuple(shapes))
    raise RuntimeError("could not place the shapes")  # not reached with the sizes above


def _varied_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """Light to dark, grey or slightly tinted (the varied scenes')."""
    v = rng.uniform(20, 250)
    tint = rng.uniform(-10, 10, size=3) * (rng.random() < 0.5)
    return tuple(int(np.clip(v + t, 0, 255)) for t in tint)


def _shape_mask(s: Shape, width: int, height: int) -> np.ndarray:
    scene = Scene(width, height, (0, 0, 0), (Shape(s.kind, s.color, s.cx, s.cy, s.size, (255, 255, 255), width),))
    return np.asarray(scene.render())[..., 0] > 127


def _in_contact(masks: list[np.ndarray]) -> bool:
    """Whether any two of the shapes overlap or touch (pixels within 2 px of each other)."""
    for i, m in enumerate(masks):
        near = m.copy()  # m grown by 2 px in the four directions, twice
        for _ in range(2):
            grown = near.copy()
            grown[1:] |= near[:-1]
            grown[:-1] |= near[1:]
            grown[:, 1:] |= near[:, :-1]
            grown[:, :-1] |= near[:, 1:]
            near = grown
        if any((near & other).any() for other in masks[i + 1:]):
            return True
    return False


def varied_scene(rng: np.random.Generator, n_shapes: int | None = None, contact: bool = False) -> Scene:
    """The training scenes of issue 21, wider than the fixed task: canvases 160-400 px a side with aspect ratios
    1:2 to 2:1 and backgrounds from light to dark; shapes 10-45% of the shorter side, which may touch or overlap
    as long as no shape loses more than a third of its pixels under the ones drawn after it; the rest as
    random_scene (no shape-colour pair twice, no centre within 10% of the width of the middle). ``contact``: two
    or three shapes of which at least two touch or overlap (what a uniform draw gives in a minority of scenes,
    and what the model reads worst)."""
    for _ in range(10_000 if contact else 1000):
        short = int(rng.integers(160, 401))
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        width, height = (int(short * ratio), short) if ratio >= 1 else (short, int(short / ratio))
        if max(width, height) > 400:
            continue
        n = int(n_shapes or rng.integers(2 if contact else 1, 4))
        shapes = _place_shapes(rng, n, width, height, (0.10, 0.45), gap=None)
        if shapes is None:
            continue
        masks = [_shape_mask(s, width, height) for s in shapes]
        hidden_ok, covered = True, np.zeros_like(masks[0])
        for m in reversed(masks):  # what the shapes drawn after each one cover of it
            hidden_ok &= bool((m & ~covered).sum() >= (2 / 3) * m.sum())
            covered |= m
        background = _varied_background(rng)
        distinct = all(sum(abs(a - b) for a, b in zip(s.rgb, background)) >= 90 for s in shapes)
        if hidden_ok and distinct and all(m.sum() >= 30 for m in masks) and (not contact or _in_contact(masks)):
            return Scene(width, height, background, tuple(shapes))
    raise RuntimeError("could not place the shapes")


def questions_for(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """Every allowed question about the scene (one per form and target; a sample of the rest)."""
    shapes = scene.shapes
    out = [Question("count", "How many shapes are there?", str(len(shapes)))]
    kinds = [s.kind for s in shapes]
    colors = [s.color for s in shapes]
    for s in shapes:
        if kinds.count(s.kind) == 1:
            out.append(Question("color", f"What color is the {s.kind}?", s.color, s))
        if colors.count(s.color) == 1:
            out.append(Question("shape", f"What shape is the {s.color} one?", s.kind, s))
        out.append(Question("exists", f"Is there a {s.color} {s.kind}?", "yes", s))
        out.append(Question("side", f"Is the {s.color} {s.kind} on the left or the right?", s.side, s))
    present = {(s.kind, s.color) for s in shapes}
    absent = [(k, c) for k in SHAPES for c in COLORS if (k, c) not in present]
    for i in rng.choice(len(absent), size=min(len(shapes), len(absent)), replace=False):
        k, c = absent[int(i)]
        out.append(Question("exists", f"Is there a {c} {k}?", "no"))
    return out


def samples(seed: int, n: int, balanced: bool = True) -> Iterator[tuple[Scene, Question]]:
    """``n`` (scene, question) pairs from ``seed``; balanced: forms in turn, so each is ~n/5."""
    rng = np.random.default_rng(seed)
    i = 0
    while i < n:
        scene = random_scene(rng)
        qs = questions_for(scene, rng)
        if balanced:
            wanted = FORMS[i % len(FORMS)]
            qs = [q for q in qs if q.form == wanted]
            if not qs:
                continue
        yield scene, qs[int(rng.integers(0, len(qs)))]
        i += 1


def is_correct(generated: str, expected: str) -> bool:
    """The task's rule: stripped, lower-cased, a final period removed, then equal."""
    text = generated.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    return text == expected.lower()
