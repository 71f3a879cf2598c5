"""ConvLLaVA's vision side in PyTorch: ConvNeXt tower (5 stages) + projector, loaded key by key.

The tower is built from transformers' own ConvNeXt blocks, which is what the official code runs
(llava/model/multimodal_encoder/convnext_encoder.py) and whose parameter names the checkpoints
carry. We take ``embeddings`` and ``encoder`` but not ``ConvNextModel`` itself: its final
``layernorm`` only feeds the pooled output, which ConvLLaVA never uses, so leaving it out lets the
loader demand that every other tensor is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import ConvNextConfig
from transformers.models.convnext.modeling_convnext import ConvNextEmbeddings, ConvNextEncoder

from ...errors import CheckpointError
from ...preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig
from ..checkpoint import TensorStore, check_shape
from ..config import LlavaConfig, read_json
from ..projector import build_projector
from .tower import TowerConfig

TOWER_PREFIX = "model.vision_tower.vision_tower."  # the tower copy inside the sft shards
PROJECTOR_PREFIX = "model.mm_projector."
UNUSED_TOWER_KEYS = ("layernorm.weight", "layernorm.bias")  # ConvNextModel's pooled-output norm
_DWCONV = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight$")


# -- where the tower comes from ---------------------------------------------------------------------
@dataclass
class TowerSource:
    store: TensorStore
    prefix: str  # "" in a tower folder, TOWER_PREFIX inside the checkpoint's shards
    config: TowerConfig
    preprocess: PreprocessConfig
    origin: str  # for messages: "--vision-tower DIR" or "the checkpoint's shards"
    notes: list[str] = field(default_factory=list)

    def keys(self) -> list[str]:
        """Tower tensor names without the prefix, minus the unused final norm."""
        n = len(self.prefix)
        return [k[n:] for k in self.store.keys() if k.startswith(self.prefix) and k[n:] not in UNUSED_TOWER_KEYS]


@dataclass
class VisionCheckpoint:
    llava: LlavaConfig
    store: TensorStore
    tower: TowerSource
    notes: list[str] = field(default_factory=list)  # what the user should know: sources, differences


def open_vision_checkpoint(checkpoint: str | Path, vision_tower: str | Path | None = None) -> VisionCheckpoint:
    """Read config and shard layout of a ConvLLaVA folder (and a separate tower folder, if given)."""
    checkpoint = Path(checkpoint)
    llava = LlavaConfig.load(checkpoint)
    store = TensorStore(checkpoint)
    has_copy = any(k.startswith(TOWER_PREFIX) for k in store.keys())
    if vision_tower is not None:
        tower = _tower_from_folder(Path(vision_tower))
        notes = [f"vision tower from --vision-tower {vision_tower}"]
        if has_copy:
            notes.append(compare_towers(tower, store))
    elif has_copy:
        tower = _tower_from_shards(store, llava, checkpoint)
        notes = [f"vision tower from the copy in the checkpoint's shards ({TOWER_PREFIX}*)"]
    else:
        raise CheckpointError(f"{checkpoint}: no vision tower: the shards hold no {TOWER_PREFIX}* tensors "
                              f"and no --vision-tower DIR was given (the config names {llava.mm.vision_tower!r})")
    if tower.config.out_channels != llava.mm.mm_hidden_size:
        raise CheckpointError(f"{llava.path}: mm_hidden_size {llava.mm.mm_hidden_size} but the tower from "
                              f"{tower.origin} outputs {tower.config.out_channels} channels")
    return VisionCheckpoint(llava=llava, store=store, tower=tower, notes=notes + tower.notes)


def _tower_from_folder(folder: Path) -> TowerSource:
    config = TowerConfig.load(folder)
    notes = []
    pre_path = folder / "preprocessor_config.json"
    if pre_path.is_file():
        preprocess = PreprocessConfig.from_dict(read_json(pre_path), stride=config.stride)
    elif config.image_size:
        preprocess = _clip_defaults(config.image_size, config.stride)
        notes.append(f"{folder} has no preprocessor_config.json: CLIP mean/std at {config.image_size} px")
    else:
        raise CheckpointError(f"{folder}: no preprocessor_config.json and no image_size in config.json")
    return TowerSource(TensorStore(folder), "", config, preprocess, f"--vision-tower {folder}", notes)


def _tower_from_shards(store: TensorStore, llava: LlavaConfig, checkpoint: Path) -> TowerSource:
    config = infer_tower_config(store, TOWER_PREFIX)
    pre_path = checkpoint / "preprocessor_config.json"
    if pre_path.is_file():
        return TowerSource(store, TOWER_PREFIX, config,
                           PreprocessConfig.from_dict(read_json(pre_path), stride=config.stride),
                           "the checkpoint's shards", [f"preprocessing from {pre_path}"])
    if llava.mm.vision_resolution:
        size, where = llava.mm.vision_resolution, "mm_vision_resolution"
    elif match := re.search(r"(\d{3,4})/?$", llava.mm.vision_tower):  # "ConvLLaVA/ConvLLaVA-ConvNeXt-768"
        size, where = int(match.group(1)), f"the tower name {llava.mm.vision_tower!r}"
    else:
        raise CheckpointError(f"{llava.path}: cannot tell the image resolution (no preprocessor_config.json, "
                              "no mm_vision_resolution); pass --vision-tower DIR")
    return TowerSource(store, TOWER_PREFIX, config, _clip_defaults(size, config.stride), "the checkpoint's shards",
                       [f"resolution {size} px from {where}, CLIP mean/std"])


def _clip_defaults(size: int, stride: int) -> PreprocessConfig:
    out = PreprocessConfig(image_size=size, crop_size=(size, size), image_mean=CLIP_MEAN, image_std=CLIP_STD,
                           stride=stride)
    out.validate()
    return out


def infer_tower_config(store: TensorStore, prefix: str) -> TowerConfig:
    """Stages, depths and widths from the tensor names and shapes (the shards carry no tower config)."""
    depth: dict[int, int] = {}
    width: dict[int, int] = {}
    for key in store.keys():
        if key.startswith(prefix) and (m := _DWCONV.match(key[len(prefix):])):
            stage, layer = int(m.group(1)), int(m.group(2))
            depth[stage] = max(depth.get(stage, 0), layer + 1)
            width[stage] = store.info(key).shape[0]
    if not depth or sorted(depth) != list(range(len(depth))):
        raise CheckpointError(f"{store.folder}: cannot infer the tower's stages from {prefix}encoder.stages.* "
                              f"(found stages {sorted(depth)})")
    stem = store.info(prefix + "embeddings.patch_embeddings.weight").shape  # [C0, 3, p, p]
    stages = range(len(depth))
    return TowerConfig(depths=tuple(depth[s] for s in stages), hidden_sizes=tuple(width[s] for s in stages),
                       patch_size=int(stem[-1]), num_channels=int(stem[1]))


def compare_towers(tower: TowerSource, store: TensorStore) -> str:
    """Say whether the shard copy equals the separate tower (the official loader ignores the copy)."""
    names = set(tower.keys())
    n = len(TOWER_PREFIX)
    copy = {k[n:] for k in store.keys() if k.startswith(TOWER_PREFIX) and k[n:] not in UNUSED_TOWER_KEYS}
    if names != copy:
        return (f"the tower copy in the shards differs from --vision-tower: {len(names ^ copy)} tensor names "
                f"are in only one of them; using --vision-tower")
    differing, worst = 0, 0.0
    for name in sorted(names):
        a, b = tower.store.get(name).float(), store.get(TOWER_PREFIX + name).float()
        if a.shape != b.shape:
            differing += 1
            worst = float("inf")
        elif not torch.equal(a, b):
            differing += 1
            worst = max(worst, float((a - b).abs().max()))
    if differing == 0:
        return f"the tower copy in the shards is identical to --vision-tower ({len(names)} tensors)"
    return (f"the tower copy in the shards differs from --vision-tower in {differing} of {len(names)} tensors "
            f"(max abs difference {worst:.3g}); using --vision-tower")


# -- the modules ------------------------------------------------------------------------------------
class ConvNextTower(nn.Module):
    """pixel_values [B, 3, H, W] -> features [B, C_last, H / stride, W / stride]."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        hf = ConvNextConfig(**config.to_hf_dict())
        self.embeddings = ConvNextEmbeddings(hf)
        self.encoder = ConvNextEncoder(hf)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(pixel_values)).last_hidden_state


class ConvLlavaVision(nn.Module):
    """pixel_values [1, 3, H, W] -> image_embeds [1, (H/64) * (W/64), n_embd], ready for the LLM."""

    def __init__(self, tower: TowerConfig, projector_type: str, n_embd: int):
        super().__init__()
        self.vision_tower = ConvNextTower(tower)
        self.mm_projector = build_projector(projector_type, tower.out_channels, n_embd)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features_and_embeds(pixel_values)[1]

    def features_and_embeds(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tower tokens [B, n_tokens, C_tower], projected [B, n_tokens, n_embd])."""
        features = self.vision_tower(pixel_values)  # [B, C, H/64, W/64]
        b, c, h, w = features.shape
        tokens = features.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, H/64 * W/64, C], row-major as official
        return tokens, self.mm_projector(tokens)  # projector: [B, n_tokens, n_embd]


class VisionGraph(nn.Module):
    """What the ONNX graph computes: both outputs, features first (FEATURES_NAME, OUTPUT_NAME)."""

    def __init__(self, model: ConvLlavaVision):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.features_and_embeds(pixel_values)


def load_vision_model(ckpt: VisionCheckpoint) -> ConvLlavaVision:
    """Build the module and put every tensor in by name; every key used, every shape checked.

    The module is built on the meta device and the checkpoint's tensors (converted to fp32) become its parameters
    (``assign``): one copy of the tower in memory, not a random-initialised one beside the loaded one (at 1536 px
    the tower is 2.8 GB in fp32)."""
    with torch.device("meta"):
        model = ConvLlavaVision(ckpt.tower.config, ckpt.llava.mm.projector_type, ckpt.llava.llm.hidden_size)
    tower = ckpt.tower
    sources: dict[str, tuple[TensorStore, str]] = {}
    for name in model.state_dict():
        if name.startswith("vision_tower."):
            sources[name] = (tower.store, tower.prefix + name.removeprefix("vision_tower."))
        else:
            sources[name] = (ckpt.store, "model." + name)
    state = {}
    for name, param in model.state_dict().items():
        store, key = sources[name]
        tensor = store.get(key)  # raises naming the key and the index/folder when absent
        check_shape(key, tensor, tuple(param.shape), store.file_of(key))
        state[name] = tensor.to(torch.float32)
    used = {key for _, key in sources.values()}
    leftovers = [tower.prefix + k for k in tower.keys() if tower.prefix + k not in used]
    leftovers += [k for k in ckpt.store.keys() if k.startswith(PROJECTOR_PREFIX) and k not in used]
    if leftovers:
        first = leftovers[0]
        store = tower.store if first in tower.store else ckpt.store
        raise CheckpointError(f"{store.file_of(first)}: unexpected tensor {first!r} ({len(leftovers)} unused in all): "
                              "the config does not describe these weights")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
