"""ConvLLaVA's vision tower config: a ConvNeXt (HF ConvNextConfig keys) with a 5th stage, read and bounded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ..config import (MAX_HIDDEN, MAX_IMAGE_SIDE, MAX_LAYERS, MAX_PATCH, MAX_TOWER_STAGES, _as_int, check_int, get_value,
                      read_json)


@dataclass(frozen=True)
class TowerConfig:
    """A ConvNeXt tower (HF ConvNextConfig keys); ConvLLaVA's has 5 stages."""

    depths: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    patch_size: int = 4
    num_channels: int = 3
    image_size: int | None = None
    hidden_act: str = "gelu"

    def __post_init__(self):
        # Also built from the shards' tensor names and shapes (vision_model.infer_tower_config), where a
        # renamed key can claim 100000 layers: checked on every construction, not only in load().
        check_tower(self.depths, self.hidden_sizes, self.patch_size, self.num_channels, self.image_size,
                    "ConvNeXt tower config")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stride(self) -> int:
        """Pixels per output token side: the patch stem, then a 2x downsampling per later stage."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    @property
    def out_channels(self) -> int:
        return self.hidden_sizes[-1]

    @classmethod
    def load(cls, folder: Path) -> "TowerConfig":
        path = Path(folder) / "config.json"
        cfg = read_json(path)
        if cfg.get("model_type", "convnext") != "convnext":
            raise CheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not a ConvNeXt tower")
        depths, sizes = _int_list(cfg, "depths", path), _int_list(cfg, "hidden_sizes", path)
        if "num_stages" in cfg and get_value(cfg, "num_stages", path) != len(depths):
            raise CheckpointError(f"{path}: num_stages {cfg['num_stages']} but {len(depths)} depths")
        act = str(cfg.get("hidden_act", "gelu"))
        if act != "gelu":
            raise CheckpointError(f"{path}: hidden_act {act!r} is not supported (expected 'gelu')")
        # image_size is a hint (preprocessor_config.json decides); HF's default config carries 224.
        size = cfg.get("image_size")
        image_size = None if isinstance(size, bool) or not isinstance(size, int) else get_value(cfg, "image_size", path)
        patch, channels = get_value(cfg, "patch_size", path, default=4), get_value(cfg, "num_channels", path, default=3)
        check_tower(depths, sizes, patch, channels, image_size, path)  # named by the file before construction
        return cls(depths=depths, hidden_sizes=sizes, patch_size=patch, num_channels=channels,
                   image_size=image_size, hidden_act=act)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a ConvNextModel of this shape would carry."""
        return {
            "model_type": "convnext", "architectures": ["ConvNextModel"], "num_stages": self.num_stages,
            "depths": list(self.depths), "hidden_sizes": list(self.hidden_sizes), "patch_size": self.patch_size,
            "num_channels": self.num_channels, "hidden_act": self.hidden_act, "layer_norm_eps": 1e-12,
            "layer_scale_init_value": 1e-6, "drop_path_rate": 0.0, "image_size": self.image_size or 224,
        }


def _int_list(cfg: dict[str, Any], key: str, path: Path) -> tuple[int, ...]:
    value = cfg.get(key, [])
    if not isinstance(value, list):
        raise CheckpointError(f"{path}: key {key!r} = {value!r} is not a list")
    return tuple(_as_int(v, f"{key}[{i}]", path) for i, v in enumerate(value))


def check_tower(depths: tuple[int, ...], hidden_sizes: tuple[int, ...], patch_size: int, num_channels: int,
                image_size: int | None, where: Path | str) -> None:
    """A ConvNeXt tower the exporter can build: stages, widths and sizes positive and bounded."""
    if not depths or len(depths) != len(hidden_sizes):
        raise CheckpointError(f"{where}: depths {list(depths)} and hidden_sizes {list(hidden_sizes)} must be "
                              "non-empty and of equal length")
    if len(depths) > MAX_TOWER_STAGES:
        raise CheckpointError(f"{where}: {len(depths)} stages, expected at most {MAX_TOWER_STAGES}")
    for i, (depth, width) in enumerate(zip(depths, hidden_sizes)):
        check_int(where, f"depths[{i}]", depth, 1, MAX_LAYERS)
        check_int(where, f"hidden_sizes[{i}]", width, 1, MAX_HIDDEN)
    check_int(where, "patch_size", patch_size, 1, MAX_PATCH)
    if num_channels != 3:  # preprocessing makes RGB pixels
        raise CheckpointError(f"{where}: key 'num_channels' = {num_channels!r}, expected 3 (RGB)")
    if image_size is not None:
        check_int(where, "image_size", image_size, 1, MAX_IMAGE_SIDE)
