"""backends/torch_format.py writes torch.save's format without torch (vLLM's prompt_embeds): torch itself reads
it back, with weights_only=True as vLLM does, to the same values, shape and dtype."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from convllava_edge.backends.torch_format import save_tensor


@pytest.mark.parametrize("shape", [(5, 256), (1, 7, 64), (3,), (300, 4096)])
def test_torch_load_reads_what_it_wrote(shape):
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float64)  # cast to float32 on the way
    tensor = torch.load(io.BytesIO(save_tensor(values)), weights_only=True)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == shape and tensor.is_contiguous()
    assert np.array_equal(tensor.numpy(), values.astype(np.float32))


def test_a_file_on_disk_maps_too(tmp_path):
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = tmp_path / "rows.pt"
    path.write_bytes(save_tensor(values))
    tensor = torch.load(path, weights_only=True, mmap=True)  # needs torch's 64-byte data alignment
    assert np.array_equal(tensor.numpy(), values)
