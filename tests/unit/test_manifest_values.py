"""A manifest's preprocessing values: every mistyped, missing or out-of-range value is one ConfigError line,
good values round-trip (the default aspect included)."""

from __future__ import annotations


import pytest

from convllava_edge.errors import ConfigError
from convllava_edge.preprocess import MAX_IMAGE_SIDE, PreprocessConfig


# -- manifest values ---------------------------------------------------------------------------------------
GOOD = PreprocessConfig(image_size=336, crop_size=(336, 336), stride=14).to_dict()


def _with(**changes):
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()
BAD_MANIFESTS = [
    None, [], "preprocess", _with(image_size=_DROP), _with(stride=_DROP), _with(crop_size=_DROP),
    _with(image_size="336"), _with(image_size=[336]), _with(image_size={"a": [1]}), _with(image_size=None),
    _with(image_size=0), _with(image_size=-336), _with(image_size=336.5), _with(image_size=True),
    _with(image_size=MAX_IMAGE_SIDE + 1), _with(image_size=10**400), _with(image_size=float("nan")),
    _with(crop_size=336), _with(crop_size=[336]), _with(crop_size=[336, "x"]), _with(crop_size=[0, 0]),
    _with(crop_size=[337, 336]), _with(crop_size=[8190, 8190], stride=_DROP), _with(crop_size={"h": 1}),
    _with(stride=0), _with(stride=-14), _with(stride="14"), _with(stride=MAX_IMAGE_SIDE * 2),
    _with(image_mean=[float("nan"), 0.4, 0.4]), _with(image_mean="abc"), _with(image_mean=[0.5, 0.5]),
    _with(image_mean=[2.0, 0.4, 0.4]), _with(image_mean=[[0.5], 0.4, 0.4]), _with(image_mean=None),
    _with(image_std=[0.0, 0.3, 0.3]), _with(image_std=[float("inf"), 0.3, 0.3]), _with(image_std=[-1, 1, 1]),
    _with(rescale_factor=0), _with(rescale_factor=float("nan")), _with(rescale_factor="1/255"),
    _with(rescale_factor=10**400), _with(rescale_factor=2.0), _with(rescale_factor=[1]),
    _with(resample=99), _with(resample="bicubic"), _with(resample=True), _with(resample=3.5),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("manifest", BAD_MANIFESTS, ids=range(len(BAD_MANIFESTS)))
def test_bad_manifest_preprocess_values_are_one_config_error(manifest):
    with pytest.raises(ConfigError) as info:
        PreprocessConfig.from_manifest(manifest)
    assert "\n" not in str(info.value)


@pytest.mark.timeout(30)
def test_good_manifest_values_round_trip():
    assert PreprocessConfig.from_manifest(GOOD).to_dict() == GOOD
    # the default aspect mode is part of the config now (issue 33); unknown keys are still dropped
    assert PreprocessConfig.from_manifest({**GOOD, "aspect": "crop", "unknown": [1]}).to_dict() == {**GOOD, "aspect": "crop"}
    assert PreprocessConfig.from_manifest({k: v for k, v in GOOD.items() if k != "aspect"}).aspect == "pad"
    with pytest.raises(ConfigError, match="unknown preprocess aspect 'wide'"):
        PreprocessConfig.from_manifest({**GOOD, "aspect": "wide"})
    as_floats = PreprocessConfig.from_manifest(_with(image_size=336.0, stride=14.0))  # integral floats are sizes
    assert as_floats.image_size == 336 and type(as_floats.image_size) is int


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cfg", [
    [], {"size": "abc"}, {"size": {"shortest_edge": [1]}}, {"size": {"height": 2, "width": 3}},
    {"size": 336, "crop_size": {"height": 336}}, {"size": 336, "crop_size": "x"}, {"size": 10**9},
    {"size": 336, "image_mean": [1, 2]}, {"size": 336, "resample": "nearest"}, {"size": 336, "rescale_factor": None},
])
def test_bad_preprocessor_configs_are_one_config_error(cfg):
    with pytest.raises(ConfigError) as info:
        PreprocessConfig.from_dict(cfg, stride=16)
    assert "\n" not in str(info.value)
