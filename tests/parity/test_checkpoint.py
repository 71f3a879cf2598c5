"""Reading ConvLLaVA checkpoints: layouts, storage dtypes, tower sources, and every bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from convllava_edge.errors import CheckpointError
from convllava_edge.export.checkpoint import TensorStore
from convllava_edge.export.convllava.vision_model import (TOWER_PREFIX, infer_tower_config, load_vision_model,
                                                open_vision_checkpoint)

from convllava_edge.export.convllava import synthetic as S
from support.tiny import SPEC


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_release_layout_files(tiny):
    names = sorted(p.name for p in tiny.bin_ckpt.iterdir())
    assert names == ["config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
                     "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
                     "tokenizer.model", "tokenizer_config.json"]
    index = json.loads((tiny.bin_ckpt / "pytorch_model.bin.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    shard = torch.load(tiny.bin_ckpt / "pytorch_model-00002-of-00002.bin", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in shard.values())
    config = json.loads((tiny.bin_ckpt / "config.json").read_text())
    assert config["model_type"] == "llava" and config["mm_projector_type"] == "mlp2x_gelu"
    keys = set(index["weight_map"])
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight",
            TOWER_PREFIX + "layernorm.weight", TOWER_PREFIX + "encoder.stages.4.layers.1.layer_scale_parameter",
            TOWER_PREFIX + "encoder.stages.4.downsampling_layer.0.weight"} <= keys
    assert sorted(p.name for p in tiny.tower.iterdir()) == ["config.json", "preprocessor_config.json",
                                                            "pytorch_model.bin"]


def test_both_formats_read_the_same_tensors(tiny):
    a, b = TensorStore(tiny.bin_ckpt), TensorStore(tiny.st_ckpt)
    assert (a.format, b.format) == ("bin", "safetensors")
    assert set(a.keys()) == set(b.keys())
    for key in ("model.mm_projector.0.weight", TOWER_PREFIX + "embeddings.patch_embeddings.weight",
                "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(a.get(key), b.get(key))


def test_tower_config_inferred_from_shards_equals_the_folder(tiny):
    ckpt = open_vision_checkpoint(tiny.bin_ckpt)
    assert ckpt.tower.config.depths == S.TINY_TOWER.depths
    assert ckpt.tower.config.hidden_sizes == S.TINY_TOWER.hidden_sizes
    assert ckpt.tower.config.stride == 64
    assert ckpt.tower.preprocess.crop_size == (256, 256)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_storage_load(tmp_path, dtype, tiny):
    vision = tiny.vision_state
    llm = S.random_llama_state(SPEC, seed=1)
    folder = S.write_convllava_checkpoint(tmp_path / "ck", SPEC, S.TINY_TOWER, vision_state=vision, llm_state=llm,
                                          fmt="safetensors", shards=1, dtype=dtype)
    model = load_vision_model(open_vision_checkpoint(folder))
    got = model.state_dict()["mm_projector.0.weight"]
    assert got.dtype == torch.float32
    assert torch.equal(got, vision["mm_projector.0.weight"].to(dtype).float())


def test_identical_tower_copy_is_reported(tiny):
    ckpt = open_vision_checkpoint(tiny.bin_ckpt, tiny.tower)
    assert any("identical" in n for n in ckpt.notes)


def test_differing_tower_copy_is_reported(tiny, tmp_path):
    tower = _copy(tiny.tower, tmp_path / "tower")
    state = torch.load(tower / "pytorch_model.bin", weights_only=True)
    state["encoder.stages.2.layers.0.pwconv1.weight"] = state["encoder.stages.2.layers.0.pwconv1.weight"] * 1.5
    torch.save(state, tower / "pytorch_model.bin")
    ckpt = open_vision_checkpoint(tiny.bin_ckpt, tower)
    note = next(n for n in ckpt.notes if "differs" in n)
    assert "1 of" in note and "using --vision-tower" in note


def test_unused_final_layernorm_is_ignored_but_other_extras_are_not(tiny, tmp_path):
    tower = _copy(tiny.tower, tmp_path / "tower")
    state = torch.load(tower / "pytorch_model.bin", weights_only=True)
    assert "layernorm.weight" in state  # the released towers carry it
    state["encoder.stages.0.layers.0.extra"] = torch.zeros(3)
    torch.save(state, tower / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: unexpected tensor 'encoder\.stages\.0\.layers\.0\.extra'"):
        load_vision_model(open_vision_checkpoint(tiny.bin_ckpt, tower))


def test_missing_shard_names_the_file(tiny, tmp_path):
    ck = _copy(tiny.bin_ckpt, tmp_path / "ck")
    (ck / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="shard 'pytorch_model-00002-of-00002.bin'.*missing"):
        open_vision_checkpoint(ck)


def test_corrupt_shard_names_the_file(tiny, tmp_path):
    ck = _copy(tiny.bin_ckpt, tmp_path / "ck")
    shard = ck / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin: cannot read"):
        load_vision_model(open_vision_checkpoint(ck))


def test_corrupt_safetensors_names_the_file(tiny, tmp_path):
    ck = _copy(tiny.st_ckpt, tmp_path / "ck")
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = ck / index["weight_map"]["model.mm_projector.0.weight"]  # one the vision side must read
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read safetensors"):
        load_vision_model(open_vision_checkpoint(ck))


def test_missing_tensor_names_the_key(tiny, tmp_path):
    ck = _copy(tiny.st_ckpt, tmp_path / "ck")
    index_path = ck / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.mm_projector.2.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: missing tensor 'model.mm_projector.2.weight'"):
        load_vision_model(open_vision_checkpoint(ck))


def test_wrong_shape_names_key_file_and_shapes(tiny, tmp_path):
    llm = S.random_llama_state(SPEC, seed=1)
    vision = dict(tiny.vision_state)
    vision["mm_projector.2.weight"] = vision["mm_projector.2.weight"][:, :128]
    ck = S.write_convllava_checkpoint(tmp_path / "ck", SPEC, S.TINY_TOWER, vision_state=vision, llm_state=llm, shards=1)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: tensor 'model.mm_projector.2.weight' has shape "
                                              r"\[256, 128\], expected \[256, 256\]"):
        load_vision_model(open_vision_checkpoint(ck))


@pytest.mark.parametrize("key,value,message", [
    ("mm_projector_type", "mlp2x_relu", "unknown mm_projector_type 'mlp2x_relu'"),
    ("mm_vision_select_layer", -2, "mm_vision_select_layer -2 is not supported"),
    ("model_type", "llama", "model_type 'llama' is not a ConvLLaVA checkpoint"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end true is not supported"),
])
def test_unsupported_configs_are_refused_by_name(tiny, tmp_path, key, value, message):
    ck = _copy(tiny.bin_ckpt, tmp_path / "ck")
    config = json.loads((ck / "config.json").read_text())
    config[key] = value
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as info:
        open_vision_checkpoint(ck)
    assert "config.json" in str(info.value)


def test_no_tower_anywhere_is_a_clear_error(tiny, tmp_path):
    llm = S.random_llama_state(SPEC, seed=1)
    ck = S.write_convllava_checkpoint(tmp_path / "ck", SPEC, S.TINY_TOWER, vision_state=tiny.vision_state,
                                      llm_state=llm, include_tower_copy=False, shards=1)
    with pytest.raises(CheckpointError, match="no vision tower.*--vision-tower"):
        open_vision_checkpoint(ck)
    assert open_vision_checkpoint(ck, tiny.tower).tower.origin.startswith("--vision-tower")


def test_index_cannot_point_outside_the_folder(tiny, tmp_path):
    ck = _copy(tiny.bin_ckpt, tmp_path / "ck")
    index_path = ck / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file in this folder"):
        TensorStore(ck)


class _Exploit:
    """A pickle that would create a file if it were ever unpickled with code execution allowed."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_pickled_code_in_a_bin_never_runs(tiny, tmp_path):
    ck = _copy(tiny.bin_ckpt, tmp_path / "ck")
    sentinel = tmp_path / "pwned"
    shard = ck / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.mm_projector.0.weight"] = _Exploit(sentinel)
    torch.save(state, shard, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin: cannot read"):
        load_vision_model(open_vision_checkpoint(ck))
    assert not sentinel.exists()


def test_infer_tower_config_requires_contiguous_stages(tiny):
    cfg = infer_tower_config(TensorStore(tiny.st_ckpt), TOWER_PREFIX)
    assert cfg.num_stages == 5 and cfg.patch_size == 4
