"""Seeded synthetic pictures for validating and measuring graphs when the user gives no images.

Not photographs, but not noise either: smooth colour fields, hard-edged shapes, thin lines, text-like
strokes and sensor-like noise, at several aspect ratios, so activations cover the ranges real images
produce (uniform noise would under-state int8 error on edges and over-state it on flat areas).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..image import image_files, open_image

PROBE_SIZES = ((640, 480), (480, 640), (512, 512), (800, 320), (300, 700), (1024, 768))


def probe_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [_probe(rng, *PROBE_SIZES[i % len(PROBE_SIZES)]) for i in range(n)]


def _probe(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)  # a smooth background from a 4x4 field
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(width // 10, width // 2)), y0 + int(rng.integers(height // 10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 6)))
    for _ in range(int(rng.integers(0, 4))):  # rows of small dark strokes, like text
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height))
        for k in range(int(rng.integers(5, 20))):
            draw.rectangle((x + 9 * k, y, x + 9 * k + 5, y + 10), fill=(20, 20, 20))
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.2))))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 4.0, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def images_in(folder: str | Path, limit: int | None = None) -> list[Image.Image]:
    """The images of ``folder`` (sorted by name), decoded, for calibration."""
    return [open_image(p) for p in image_files(folder)[:limit]]
