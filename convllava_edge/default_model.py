"""The demo bundle shipped inside the package (see README: the first command runs it)."""

from __future__ import annotations

from pathlib import Path

from .errors import BundleError
from .manifest import MANIFEST_NAME

DEMO_BUNDLE = Path(__file__).parent / "models" / "shapes-demo"


def default_bundle() -> Path:
    if not (DEMO_BUNDLE / MANIFEST_NAME).is_file():
        raise BundleError(f"no --model given and no demo model is installed at {DEMO_BUNDLE}")
    return DEMO_BUNDLE
