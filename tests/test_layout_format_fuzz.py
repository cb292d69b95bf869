"""Random damage to .sflash files (property-based): every outcome is a LayoutError, or the damage
hit only padding and the file reads back exactly as before."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_layout_format_samples import index_of, open_bytes, reassemble

from sparseflash.layout.format import LayoutError

# ---- property-based: random damage never escapes as anything but LayoutError --------------------------

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_random_truncation_is_a_layout_error(workdir, zstd_blob, data):
    cut = data.draw(st.integers(0, len(zstd_blob) - 1))
    with pytest.raises(LayoutError):
        open_bytes(workdir, zstd_blob[:cut], verify=True)


@SETTINGS
@given(data=st.data())
def test_random_byte_flips_are_caught_or_harmless(workdir, zstd_blob, data):
    original = open_bytes(workdir, zstd_blob, verify=True)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(zstd_blob) - 1), st.integers(1, 255)),
                               min_size=1, max_size=4))
    blob = bytearray(zstd_blob)
    for i, mask in flips:
        blob[i] ^= mask
    try:
        got = open_bytes(workdir, bytes(blob), verify=True)
    except LayoutError:
        return
    assert got == original  # the flips hit padding only


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        yield prefix
        return
    yield prefix
    for key, child in items:
        yield from _leaf_paths(child, (*prefix, key))


EDIT_VALUES = st.one_of(
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, -1, 64, 128, 4096, 8192, 2**31, 2**32, 2**63 - 1, 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.none(), st.text(max_size=4),
    st.sampled_from(["f32", "f16", "bf16", "i32", "i64", "u8", "u16", "none", "zstd", "embed",
                     "layers.0.ffn.permutation", "layers.1.ffn.permutation"]),
    st.lists(st.integers(-1, 40), max_size=3), st.just({}),
    st.tuples(st.just("delta"), st.sampled_from([-4096, -64, -1, 1, 64, 4096])),
    st.just("delete"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_index_edits_are_caught_or_harmless(workdir, raw_blob, zstd_blob, data):
    blob = data.draw(st.sampled_from([raw_blob, zstd_blob]))
    original = open_bytes(workdir, blob, verify=True)
    index = copy.deepcopy(index_of(blob))
    path = data.draw(st.sampled_from(list(_leaf_paths(index))[1:]))
    value = data.draw(EDIT_VALUES)
    *parents, last = path
    node = index
    for key in parents:
        node = node[key]
    if value == "delete":
        del node[last]
    elif isinstance(value, tuple):
        if type(node[last]) is not int:
            return
        node[last] += value[1]
    else:
        node[last] = value
    try:
        header, tensors, bundles = open_bytes(workdir, reassemble(blob, index=json.dumps(index).encode()), True)
    except LayoutError:
        return
    # a harmless edit (threshold, n_hot, a shape with the same bytes, a dropped unused tensor...):
    # whatever the file still describes must be original bytes
    assert header == original[0]
    assert all(b in original[2] for b in bundles)
    assert all(b in original[1].values() for b in tensors.values())
