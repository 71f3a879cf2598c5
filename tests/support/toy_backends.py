"""Two backends that exist only in the tests, to prove the backend seams as toy_family.py proves the family one: a
vision backend ("toy-vision": ONNX Runtime's sessions, run through a graph wrapper of its own that counts its
runs) and an LLM backend ("toy-llm": the scripted FakeLlm of fake_llm.py, opened on any bundle). Registered with
the public registries (convllava_edge.backends), chosen by name, run; no product file names them."""

from __future__ import annotations

from convllava_edge.backends import LlmKind, VisionKind, open_vision_backend
from convllava_edge.backends.base import LlmCapabilities

from support.fake_llm import FakeLlm

VISION, LLM = "toy-vision", "toy-llm"
ANSWER = list(" 3 shapes") + ["</s>"]  # characters are tokens (fake_llm.py)


class CountingGraph:
    def __init__(self, graph, runs: list):
        self.graph, self.runs = graph, runs
        self.path, self.input_names, self.output_names = graph.path, graph.input_names, graph.output_names

    def run(self, outputs, feeds):
        self.runs.append(self.path)
        return self.graph.run(outputs, feeds)


class ToyVisionBackend:
    def __init__(self, inner, runs: list):
        self.inner, self.runs = inner, runs
        self.providers, self.threads = ["toy"] + list(inner.providers), inner.threads
        self.note = "vision graphs on the toy backend"

    def load(self, path, inputs, outputs):
        return CountingGraph(self.inner.load(path, inputs, outputs), self.runs)


class ToyVision(VisionKind):
    name = VISION

    def __init__(self):
        self.runs: list = []  # every graph run, by path

    def open(self, device, threads, precision, cache_dir=None):
        return ToyVisionBackend(open_vision_backend(device, threads, precision=precision), self.runs)


class ToyLlm(LlmKind):
    name, runs = LLM, "a scripted answer"

    def __init__(self):
        self.opened: list = []

    def identity(self, manifest):
        return "toy-llm-weights"

    def open(self, bundle, manifest, options, n_ctx=None, n_ctx_max=None, sha256=None):
        llm = FakeLlm(n_embd=manifest.n_embd, script=list(ANSWER),
                      capabilities=LlmCapabilities(token_ids=True, kv_reuse=True))
        self.opened.append(bundle)
        return llm
