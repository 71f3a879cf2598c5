"""Fuzzing the manifest: whatever JSON a bundle carries, reading it gives a Manifest the runtime can use
or one BundleError, never another exception, a hang or a value that is silently wrong."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from convllava_edge.default_model import DEMO_BUNDLE
from convllava_edge.errors import BundleError
from convllava_edge.manifest import MANIFEST_NAME, Manifest
from convllava_edge.preprocess import PreprocessConfig
from convllava_edge.prompt import template_from_dict

VALID = json.loads((DEMO_BUNDLE / MANIFEST_NAME).read_text())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def _paths(value, prefix=()):
    """Every (path) into a JSON value, for choosing where to mutate."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(VALID) if p]


def _usable(manifest: Manifest) -> None:
    """What the runtime reads from a manifest, read the way it reads it: no exception may escape."""
    PreprocessConfig.from_manifest(manifest.preprocess.to_dict())  # what the manifest would write back
    manifest.tokens_per_image.to_dict()
    manifest.vision_entry()
    if manifest.llm is None or manifest.template is None:
        return  # a vision-only bundle: Model refuses it with a BundleError of its own
    template = template_from_dict(manifest.template)
    template.render([("How many?", None)])
    assert manifest.n_embd > 0


@pytest.mark.timeout(120)
@settings(derandomize=True, deadline=2000, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), json_values | st.sampled_from(["delete"])), min_size=1, max_size=3))
def test_mutated_manifests_read_cleanly_or_fail_with_one_bundle_error(mutations):
    data = copy.deepcopy(VALID)
    for path, value in mutations:
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if value == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the path
    try:
        manifest = Manifest.from_dict(json.loads(json.dumps(data)), "fuzz/manifest.json")
    except BundleError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz/manifest.json")
        return
    _usable(manifest)


@pytest.mark.timeout(120)
@settings(derandomize=True, deadline=2000, max_examples=200)
@given(json_values)
def test_arbitrary_json_reads_cleanly_or_fails_with_one_bundle_error(value):
    try:
        Manifest.from_dict(value, "fuzz/manifest.json")
    except BundleError as e:
        assert "\n" not in str(e)
