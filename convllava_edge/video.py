"""Video files -> frames, sampled as LLaVA-Mini's official code samples them (about one per second).

llavamini/eval/run_llava_mini.py ``load_video``: num_frm = total frames // fps, frame indices from
``get_seq_frames`` (the middle of equal segments), each frame resized to S x S with torch's
``interpolate`` default (nearest: source index = floor(dest index * in / out), not PIL's rule) before
the CLIP processor. GIFs are read with Pillow; MP4 and others with PyAV or OpenCV when installed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from .errors import ImageError
from .image import DECODE_ERRORS, MAX_IMAGE_PIXELS, read_image_bytes

MAX_FRAMES = 256  # ~4 minutes at 1 fps; each frame is one LLM position, but costs a CLIP pass


def seq_frames(total: int, wanted: int) -> list[int]:
    """get_seq_frames: the middle frame of ``wanted`` equal segments."""
    seg = float(total - 1) / wanted
    return [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2 for i in range(wanted)]


def nearest_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode='nearest') on [H, W, 3] uint8: floor(dst * in / out)."""
    h, w = frame.shape[:2]
    rows = np.minimum(np.floor(np.arange(size) * (h / size)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(size) * (w / size)).astype(np.int64), w - 1)
    return frame[rows][:, cols]


def read_frames(source: str | os.PathLike | bytes, size: int) -> tuple[list[Image.Image], bytes]:
    """(sampled frames as S x S RGB images, the file's bytes) for a video file."""
    name, data = read_image_bytes(source)
    frames, fps = _decode(name, data)
    if not frames:
        raise ImageError(f"{name}: no frames")
    total = len(frames)
    wanted = min(total, max(1, int(total // fps)), MAX_FRAMES)
    picked = [frames[i] for i in seq_frames(total, wanted)]
    return [Image.fromarray(nearest_resize(f, size)) for f in picked], data


def _decode(name: str, data: bytes) -> tuple[list[np.ndarray], float]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if getattr(im, "n_frames", 1) > 1 or im.format == "GIF":
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{name}: frames of {im.width}x{im.height} are too large")
                durations, frames = [], []
                for frame in ImageSequence.Iterator(im):
                    durations.append(frame.info.get("duration", 100) or 100)
                    frames.append(np.asarray(frame.convert("RGB")))
                return frames, 1000.0 / float(np.mean(durations))
    except DECODE_ERRORS:
        pass  # not something Pillow animates: try a video decoder
    return _decode_video(name, data)


def _decode_video(name: str, data: bytes) -> tuple[list[np.ndarray], float]:
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        try:
            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.video[0]
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
                return frames, float(stream.average_rate or 1)
        except av.error.FFmpegError as e:  # type: ignore[attr-defined]
            raise ImageError(f"{name}: cannot decode video: {e}") from e
    try:
        import cv2
    except ImportError:
        raise ImageError(f"{name}: not a GIF, and reading other video formats needs PyAV or OpenCV "
                         "(pip install av)") from None
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix or ".mp4") as tmp:
        tmp.write(data)
        tmp.flush()
        capture = cv2.VideoCapture(tmp.name)
        fps = capture.get(cv2.CAP_PROP_FPS) or 1.0
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame[:, :, ::-1].copy())
    if not frames:
        raise ImageError(f"{name}: cannot decode video")
    return frames, float(fps)
