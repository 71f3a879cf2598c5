"""ONNX Runtime provider selection for --device, and the vision backend that uses it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from convllava_edge.backends import open_vision_backend
from convllava_edge.backends.vision_ort import CPU, CUDA, TENSORRT, choose_providers
from convllava_edge.default_model import DEMO_BUNDLE
from convllava_edge.errors import BundleError, ConfigError

DEMO_GRAPH = DEMO_BUNDLE / "vision-int8.onnx"
NO_CUDA = CUDA not in ort.get_available_providers()


def test_provider_choice():
    assert choose_providers("cpu", [CUDA, CPU], True).providers == [CPU]
    assert choose_providers("auto", [TENSORRT, CUDA, CPU], True).providers == [TENSORRT, CUDA, CPU]
    assert choose_providers("auto", [TENSORRT, CUDA, CPU], False).providers == [CUDA, CPU]
    choice = choose_providers("auto", [CPU], False)
    assert choice.providers == [CPU] and "no CUDA provider" in choice.note
    with pytest.raises(Exception, match="--device cuda: this onnxruntime has no CUDA provider"):
        choose_providers("cuda", [CPU], False)
    with pytest.raises(Exception, match="unknown device 'tpu'"):
        choose_providers("tpu", [CPU], False)


def test_tensorrt_needs_both_its_provider_and_its_libraries():
    assert choose_providers("cuda", [CUDA, CPU], True).providers == [CUDA, CPU]  # libraries, no provider
    assert choose_providers("cuda", [TENSORRT, CUDA, CPU], True).providers == [TENSORRT, CUDA, CPU]
    assert choose_providers("auto", [TENSORRT, CUDA, CPU], True).note.startswith("vision on GPU (Tensorrt")
    assert choose_providers("auto", [CUDA, CPU], False).note == "vision on GPU (CUDA)"


def test_bad_devices_are_config_errors_that_list_the_choices():
    with pytest.raises(ConfigError, match=r"unknown device 'gpu' \(known: auto, cpu, cuda\)"):
        choose_providers("gpu", [CUDA, CPU], False)
    with pytest.raises(ConfigError, match="install onnxruntime-gpu"):
        choose_providers("cuda", ["AzureExecutionProvider", CPU], False)


def test_the_cpu_backend_loads_and_runs_the_demo_graph():
    backend = open_vision_backend("cpu", threads=1)
    graph = backend.load(DEMO_GRAPH, ["pixel_values"], ["image_embeds"])
    assert backend.providers == [CPU] and backend.note == "vision on CPU (ONNX Runtime)" and backend.threads == 1
    (rows,) = graph.run(["image_embeds"], {"pixel_values": np.zeros((1, 3, 256, 256), np.float32)})
    assert rows.shape == (1, 16, 256) and np.isfinite(rows).all()


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has a CUDA provider")
def test_auto_without_a_cuda_provider_runs_on_cpu_and_says_why():
    backend = open_vision_backend("auto", threads=1)
    backend.load(DEMO_GRAPH, ["pixel_values"], ["image_embeds"])
    assert backend.providers[0] == CPU and "no CUDA provider" in backend.note


def test_a_graph_with_other_inputs_or_outputs_is_refused():
    backend = open_vision_backend("cpu", threads=1)
    with pytest.raises(BundleError, match=r"expected inputs \['images'\] and outputs \['image_embeds'\]"):
        backend.load(DEMO_GRAPH, ["images"], ["image_embeds"])
    with pytest.raises(BundleError, match="expected inputs"):
        backend.load(DEMO_GRAPH, ["pixel_values"], ["hidden_states"])
    with pytest.raises(BundleError, match="graph not found"):
        backend.load(DEMO_BUNDLE / "missing.onnx", ["pixel_values"], ["image_embeds"])


def test_unknown_vision_backends_and_devices_are_refused_before_loading():
    with pytest.raises(ConfigError, match=r"unknown vision backend 'tensorflow' \(known: onnxruntime, openvino\)"):
        open_vision_backend("cpu", kind="tensorflow")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        open_vision_backend("tpu")


def test_openvino_without_its_extra_is_one_line_naming_the_extra(monkeypatch):
    """The runtime-only install has no OpenVINO: asking for it says which extra to install."""
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(ConfigError, match=r"--vision-backend openvino needs OpenVINO \(pip install 'convllava-edge\[openvino\]'\)"):
        open_vision_backend("cpu", kind="openvino")


def test_encoder_outputs_own_their_memory():
    """ORT's output arrays are views of its buffers: one kept alive (the cache, the pipeline's recent images,
    an export's reference embeddings) kept the whole session's memory (2 GB for the 1536 px tower) after
    the session was gone, and an export of a real ConvLLaVA-1536 was killed for memory. Outputs are copies."""
    from convllava_edge.default_model import DEMO_BUNDLE
    from convllava_edge.families.convllava import ConvLlavaEncoder

    encoder = ConvLlavaEncoder.from_file(next(DEMO_BUNDLE.glob("*.onnx")), "cpu", 1)
    for out in (encoder.encode(np.zeros((1, 3, 256, 256), np.float32)),
                *encoder.encode_both(np.zeros((1, 3, 256, 256), np.float32))):
        root = out
        while root.base is not None:
            root = root.base
        assert isinstance(root, np.ndarray) and root.flags.owndata, type(root)
