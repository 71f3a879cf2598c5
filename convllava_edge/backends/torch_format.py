"""A float32 array in ``torch.save``'s file format, written without torch: what vLLM's ``prompt_embeds`` takes
(base64 of a saved tensor, read back with ``torch.load(weights_only=True)``).

Written by hand because the runtime never imports torch (a 700 MB dependency for one file format). The format
is torch's zip archive: ``data.pkl`` (a protocol-2 pickle that rebuilds the tensor from a storage named by a
persistent id), ``data/0`` (the storage's raw little-endian bytes), ``byteorder`` and ``version``; every entry
stored uncompressed with its data 64-byte aligned, as torch's own writer lays it out. The pickle uses only the
globals ``weights_only`` loading allows (torch._utils._rebuild_tensor_v2, torch.FloatStorage,
collections.OrderedDict). tests/parity/test_torch_format.py reads it back with torch.load.
"""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np

ARCHIVE = "archive"
ALIGN = 64


def _string(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)  # BININT
    return b"\x8a" + bytes([8]) + value.to_bytes(8, "little", signed=True)  # LONG1


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _pickle(shape: tuple[int, ...], numel: int) -> bytes:
    stride = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    storage = _tuple([_string("storage"), b"ctorch\nFloatStorage\n", _string("0"), _string("cpu"), _int(numel)])
    args = _tuple([storage + b"Q",  # BINPERSID: the storage, by its persistent id
                   _int(0),  # storage offset
                   _tuple([_int(d) for d in shape]), _tuple([_int(s) for s in stride]),
                   b"\x89",  # requires_grad: NEWFALSE
                   b"ccollections\nOrderedDict\n)R"])  # backward hooks: OrderedDict()
    return b"\x80\x02" + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R."  # PROTO 2, GLOBAL, REDUCE, STOP


def save_tensor(array: np.ndarray) -> bytes:
    """``array`` as float32, in the bytes ``torch.save(torch.from_numpy(array))`` would write (up to layout)."""
    values = np.ascontiguousarray(array, dtype="<f4")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in ((f"{ARCHIVE}/data.pkl", _pickle(values.shape, values.size)),
                           (f"{ARCHIVE}/byteorder", b"little"),
                           (f"{ARCHIVE}/data/0", values.tobytes()),
                           (f"{ARCHIVE}/version", b"3\n")):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            # pad the local header's extra field so that the data starts on a 64-byte boundary
            header = 30 + len(name.encode())
            pad = (-(out.tell() + header + 4)) % ALIGN
            info.extra = struct.pack("<HH", 0xCAFE, pad) + b"\0" * pad  # an unregistered extra-field id, as torch's
            archive.writestr(info, data)
    return out.getvalue()
