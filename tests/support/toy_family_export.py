"""The toy family's export side (see toy_family.py): checkpoint -> one ONNX graph per variant, a template
that puts the image after the question, the Llama LLM through the product's own converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from convllava_edge.export.checkpoint import TensorStore
from convllava_edge.export.config import LlmConfig, read_json
from convllava_edge.export.families import ExportFamily, ShippedVision, VisionResult
from convllava_edge.preprocess import PreprocessConfig
from convllava_edge.prompt import ChatTemplate

MODEL_TYPE = "toy_llava"
PREFIX = "model.toy_vision."
SIZE, STRIDE = 64, 32
# The image after the question: the runtime writes "<image>\n" before the first question, this template moves it.
TEMPLATE = ChatTemplate(
    name="toy", system="A toy assistant.", bos_token="", stop=("</s>",),
    chat_template="{{ messages[0]['content'] }}{% for m in messages[1:] %}{% if m['role'] == 'user' %} USER: "
                  "{{ m['content'].replace('<image>\\n', '') }} <image> ASSISTANT:{% else %} {{ m['content'] }}</s>"
                  "{% endif %}{% endfor %}")


class ToyVision(torch.nn.Module):
    """64 px -> a 2x2 grid of 16 channels (two strided convs) -> 4 rows of the LLM's width."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.stage = torch.nn.Conv2d(8, 16, 8, stride=8)
        self.proj = torch.nn.Linear(16, n_embd)

    def forward(self, image):
        pooled = self.stage(torch.nn.functional.gelu(self.stem(image))).flatten(2).transpose(1, 2)  # [1, 4, 16]
        return pooled, self.proj(pooled)


def random_vision_state(n_embd: int, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {PREFIX + k: torch.randn(v.shape, generator=gen) / max(1, v[0].numel()) ** 0.5
            for k, v in ToyVision(n_embd).state_dict().items()}


class ToyExport(ExportFamily):
    name = "toy"
    model_types = (MODEL_TYPE,)

    def open(self, checkpoint: Path, vision_tower, options):
        return checkpoint

    def export_vision(self, checkpoint: Path, folder: Path, options, progress) -> VisionResult:
        from convllava_edge.quantize.onnx_variants import make_variant

        store = TensorStore(checkpoint)
        llm, _, _ = self.llm_config(checkpoint)
        module = ToyVision(llm.hidden_size).eval()
        module.load_state_dict({k[len(PREFIX):]: store.get(k).float() for k in store.keys() if k.startswith(PREFIX)})
        progress.stage("exporting the toy graph")
        fp32 = folder / "toy-fp32.onnx"
        torch.onnx.export(module, (torch.zeros(1, 3, SIZE, SIZE),), str(fp32), input_names=["image"],
                          output_names=["pooled", "tokens"], opset_version=17, dynamo=True, verbose=False)
        graphs = {"fp32": (fp32, "torch.onnx.export")}
        for variant in options.vision_types:
            if variant != "fp32":
                graphs[variant] = make_variant(variant, fp32, folder / f"toy-{variant}.onnx")
        shipped = [ShippedVision(v, [graphs[v][0]], graphs[v][1], tensorrt_ready=False) for v in options.vision_types]
        unshipped = [] if "fp32" in options.vision_types else [fp32]
        return VisionResult(
            vision=shipped, unshipped=unshipped,
            preprocess=PreprocessConfig(image_size=SIZE, crop_size=(SIZE, SIZE), stride=STRIDE, aspect="pad"),
            n_embd=llm.hidden_size, tokens_per_image={"rule": "4 rows", "square": 4, "stride": STRIDE},
            tower={"kind": "toy"}, template=TEMPLATE, accuracy={}, notes=["a toy family"])

    def llm_config(self, checkpoint: Path):
        cfg = read_json(Path(checkpoint) / "config.json")
        return LlmConfig.from_dict(cfg, Path(checkpoint) / "config.json"), 2048, (PREFIX,)


FAMILY = ToyExport()


def write_toy_checkpoint(folder: Path, spec, seed: int = 1) -> Path:
    """A toy checkpoint: config.json (model_type toy_llava, the Llama keys), one bf16 safetensors shard, a tokenizer."""
    from convllava_edge.export.convllava import synthetic as S

    folder.mkdir(parents=True, exist_ok=True)
    state = {**S.random_llama_state(spec, seed=seed), **random_vision_state(spec.hidden_size)}
    S.save_tensors(folder, state, fmt="safetensors")
    S.write_json(folder / "config.json", {
        "model_type": MODEL_TYPE, "architectures": ["ToyLlavaForCausalLM"], "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16"})
    S.write_llama_tokenizer(folder, spec.vocab_size)
    return folder


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
