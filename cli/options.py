"""The options several commands share, declared once (Typer's ``Annotated`` form), and the builders that turn them
into the library's settings: ``runtime_options`` (how a bundle runs: runtime.RuntimeOptions) and ``ask_options``
(how an answer is sampled: model.AskOptions). A command names its own default where it differs
(``device: Device = "cpu"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

VISION_BACKEND_HELP = ("What runs the vision graphs: auto (the default, or $CONVLLAVA_EDGE_VISION_BACKEND: times the "
                       "bundle's vision types on the backends here once and keeps the fastest within the accuracy "
                       "gate), onnxruntime (CPU, CUDA, TensorRT) or openvino (CPU; the 'openvino' extra; the only "
                       "one that runs the bf16 vision type).")
LLM_BACKEND_HELP = ("llama.cpp (the bundle's GGUF, here) or vllm (a vLLM server at --llm-url, from the bundle's llm-hf/; "
                    "docs/scale-out.md).")
LLM_URL_HELP = "The vLLM server, e.g. http://127.0.0.1:8000 (with --llm-backend vllm)."
LLM_MODEL_HELP = "The model's name on the vLLM server (default: the one it serves)."
VISION_URL_HELP = ("A Triton server running the bundle's vision graphs, http://HOST:PORT (models named by `deploy "
                   "triton`; the 'triton' extra).")
MODEL_HELP = ("Bundle folder or Hugging Face repo id ORG/NAME[@REVISION] (pulled once, then from the cache; default: "
              "the demo model shipped with the package).")
ASPECT_HELP = "pad (as trained), native (keep aspect ratio) or crop (centre crop, LLaVA-Mini's default)."

# -- how the bundle runs ---------------------------------------------------------------------------------------
ModelPath = Annotated[Optional[Path], typer.Option("--model", help=MODEL_HELP)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: the cores here).")]
VisionType = Annotated[Optional[str], typer.Option("--vision-type", help="Which vision graph (default: the bundle's first).")]
VisionBackend = Annotated[Optional[str], typer.Option("--vision-backend", help=VISION_BACKEND_HELP)]
VisionUrl = Annotated[Optional[str], typer.Option("--vision-url", envvar="CONVLLAVA_EDGE_VISION_URL", help=VISION_URL_HELP)]
LlmBackend = Annotated[str, typer.Option("--llm-backend", help=LLM_BACKEND_HELP)]
LlmUrl = Annotated[Optional[str], typer.Option("--llm-url", envvar="CONVLLAVA_EDGE_LLM_URL", help=LLM_URL_HELP)]
LlmModel = Annotated[Optional[str], typer.Option("--llm-model", help=LLM_MODEL_HELP)]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Read and write no disk cache (embeddings, KV states).")]

# -- how an answer is sampled --------------------------------------------------------------------------------
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens to generate at most.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy (deterministic).")]
TopP = Annotated[float, typer.Option("--top-p")]
Seed = Annotated[int, typer.Option("--seed", help="Sampling seed, in [0, 2**32 - 1).")]
Aspect = Annotated[Optional[str], typer.Option("--aspect", help=ASPECT_HELP)]
JsonSchema = Annotated[Optional[str], typer.Option("--json-schema", metavar="FILE|JSON", help="The answer is JSON "
                      "that fits this schema (a file, or the schema itself), constrained token by token.")]
Grammar = Annotated[Optional[Path], typer.Option("--grammar", metavar="FILE.gbnf", help="The answer follows this "
                    "GBNF grammar (llama.cpp's format, root rule 'root').")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def runtime_options(device: str = "auto", threads: Optional[int] = None, vision_type: Optional[str] = None,
                    vision_backend: Optional[str] = None, vision_url: Optional[str] = None,
                    llm_backend: str = "llama.cpp", llm_url: Optional[str] = None, llm_model: Optional[str] = None,
                    no_cache: bool = False, **more):
    """The RuntimeOptions of a command's options, checked (``more``: other fields, e.g. serve's threads_batch)."""
    from ..runtime import RuntimeOptions

    return RuntimeOptions(device=device, threads=threads, vision_type=vision_type, vision_backend=vision_backend,
                          vision_url=vision_url, llm_backend=llm_backend, llm_url=llm_url, llm_model=llm_model,
                          cache=not no_cache, **more).validate()


def ask_options(max_tokens: int, temperature: float, top_p: float, seed: int, aspect: Optional[str],
                json_schema: Optional[str] = None, grammar: Optional[Path] = None):
    """``json_schema``: a file's path or the schema's JSON itself; ``grammar``: a GBNF file (structured.py)."""
    from ..backends.base import SamplingOptions
    from ..model import AskOptions
    from ..structured import constraint_of, load

    constraint = constraint_of(load(json_schema, "--json-schema") if json_schema is not None else None,
                               load(str(grammar), "--grammar") if grammar is not None else None,
                               "--json-schema" if json_schema is not None else "--grammar")
    options = AskOptions(max_tokens=max_tokens, sampling=SamplingOptions(temperature, top_p, seed), aspect=aspect,
                         constraint=constraint)
    options.validate()
    return options
