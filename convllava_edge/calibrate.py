"""``--vision-backend auto``'s timing, where nobody waits for it.

The first ask on a new machine must not pay for timing every vision type and backend (~17 s on a 768 px bundle
here, minutes on big ones: each candidate's session is built and run). So a one-shot command (``ask``, ``chat``,
``encode``; RuntimeOptions.calibrate = "later") answers with the likely fastest pair (vision.candidates' order)
and starts this module in a process of its own at the lowest priority, after which it exits as usual: the
process times the candidates, writes the choice's record, and later runs read it. ``serve``, ``batch`` and
``bench`` time the candidates at start-up ("now"): that is before any question. One calibration runs per
record at a time (records.claim); vision.start_calibration starts it.

    python -m convllava_edge.calibrate BUNDLE [--device cpu] [--threads N]
"""

from __future__ import annotations

import os
from pathlib import Path

CALIBRATE_ENV = "CONVLLAVA_EDGE_CALIBRATE"  # "now" or "later": overrides every command's default (tests pin it)
MODES = ("now", "later")


def mode(default: str) -> str:
    """The command's ``default``, unless $CONVLLAVA_EDGE_CALIBRATE names another mode."""
    value = os.environ.get(CALIBRATE_ENV, "").strip().lower()
    return value if value in MODES else default


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .errors import ConvLlavaEdgeError
    from .manifest import load_manifest
    from .records import claim, release
    from .vision import choose_vision, claim_name

    parser = argparse.ArgumentParser(prog="python -m convllava_edge.calibrate")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--record", required=True, help="the record the parent looked for")
    args = parser.parse_args(argv)
    try:
        os.nice(19)  # the lowest priority: on two cores the user's next question keeps nearly all of the CPU
    except OSError:
        pass
    name = claim_name(args.record)
    if not claim(name, os.getpid()):
        return 0  # another calibration of this record is running
    try:
        manifest = load_manifest(args.bundle, verify=False)  # the parent verified it a moment ago
        choose_vision(args.bundle, manifest, None, args.device, args.threads, "auto", calibrate="now")
    except ConvLlavaEdgeError:
        return 1  # nothing recorded: the next run tries again
    finally:
        release(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
