"""Export families: how a checkpoint of each model family becomes a bundle's vision graphs and manifest.

The assembler (bundle.py) asks ``export_family_for(checkpoint)`` once, from config.json, and then
calls the family's steps; the runtime side of the same family lives in convllava_edge/families/.
Built in: one sub-package per family (convllava/, llava_mini/), whose __init__ holds its steps. Another family registers with ``register`` or
as an entry point of the group ``convllava_edge.export_families``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..registry import Registry
from ..preprocess import PreprocessConfig
from ..prompt import ChatTemplate, Template

BUILTIN_MODULES = ("convllava", "llava_mini")
ENTRY_POINT_GROUP = "convllava_edge.export_families"


@dataclass
class ShippedVision:
    """One vision variant as the bundle ships it."""

    variant: str  # fp32 | fp16 | bf16 | int8
    files: list[Path]  # every file, the main graph first
    method: str  # how it was made, in words
    tensorrt_ready: bool
    accuracy: dict | None = None  # against fp32
    parts: dict[str, Path] = field(default_factory=dict)  # multi-graph families: role -> graph


@dataclass
class VisionResult:
    """What a family's vision export gives the assembler: the graphs and the manifest's family fields."""

    vision: list[ShippedVision]  # in the order the user asked for
    unshipped: list[Path]  # made but not asked for (the fp32 reference graph): removed before the manifest
    preprocess: PreprocessConfig  # with the bundle's default aspect mode
    n_embd: int
    tokens_per_image: dict
    tower: dict
    template: Template | ChatTemplate
    accuracy: dict  # the vision figures measured at export
    notes: list[str]
    state: Any = None  # the family's own, for its llm_agreement


class ExportFamily:
    name: str = ""  # the runtime family's name (manifest "family")
    model_types: tuple[str, ...] = ()  # config.json model_type values
    measures_agreement: bool = False  # the manifest carries accuracy.llm_vs_unquantized (llm_agreement)
    # export_vision runs in a process of its own (isolated.py), its memory returned before the LLM stages. Only for
    # a family a fresh interpreter finds by name (built in, or an entry point): one registered at run time is not.
    vision_in_child: bool = False

    def detect(self, config: dict) -> bool:
        return config.get("model_type") in self.model_types

    def open(self, checkpoint: Path, vision_tower: Path | None, options) -> Any:
        """Read and check what the export needs, before any work or folder (errors cost nothing here)."""
        raise NotImplementedError

    def export_vision(self, opened: Any, folder: Path, options, progress) -> VisionResult:
        raise NotImplementedError

    def llm_config(self, checkpoint: Path) -> tuple[Any, int, tuple[str, ...]]:
        """(LlmConfig, sequence cap, tensor prefixes that are not the LLM's)."""
        raise NotImplementedError

    def tokenizer_info(self, vocab) -> dict:
        """The manifest's ``tokenizer`` entry (how prompts are tokenized at run time): the vocabulary's own."""
        return vocab.runtime_entry()

    def llm_agreement(self, vision: VisionResult, llm_path: Path, conversion, options) -> dict | None:
        """Quantized against unquantized LLM on image prompts (None: not measured for this family)."""
        return None

    def torch_vision_reference(self, checkpoint: Path, tower: Path | None, manifest=None) -> tuple[str, Any]:
        """(description, encoder with encode_both) of the PyTorch vision side, for ``check --reference CHECKPOINT``
        (``manifest``: the checked bundle's, which may name the tower it was exported from)."""
        from ..errors import ConfigError

        raise ConfigError(f"--reference CHECKPOINT is not supported for {self.name} bundles: pass a bundle "
                          "exported with --vision-type fp32 and --llm-type F16 or F32")


_FAMILIES: Registry[ExportFamily] = Registry(__package__, BUILTIN_MODULES, ENTRY_POINT_GROUP)


def register(family: ExportFamily) -> ExportFamily:
    return _FAMILIES.register(family)


def unregister(name: str) -> None:
    """Forget the export family of this name (a test's, when it is done with it)."""
    _FAMILIES.unregister(name)


def export_family_for(checkpoint: Path) -> ExportFamily:
    """The family whose model_type config.json names."""
    from .config import read_json

    config = read_json(Path(checkpoint) / "config.json")
    for family in _FAMILIES.values():
        if family.detect(config):
            return family
    known = [t for f in _FAMILIES.values() for t in f.model_types]
    raise CheckpointError(f"{Path(checkpoint) / 'config.json'}: model_type {config.get('model_type')!r} is not a "
                          f"model this exports (known: {', '.join(known)})")


def export_family_named(name: str) -> ExportFamily:
    family = _FAMILIES.get(name)
    if family is None:
        raise CheckpointError(f"no export family {name!r} (known: {', '.join(_FAMILIES.names())})")
    return family

