"""Property-based corruption of a small layout, run end to end through `sparseflash run`.

Corrupted bytes (bit flips, truncations) must be caught: every outcome is exit 0 with the clean file's
tokens, or exit 2 with one line. A header or index rewritten with valid checksums is another file,
not a corrupted one (a plausible rope_theta cannot be told from the true one), so there the property
is weaker: exit 0, or exit 2 with one line, never a traceback or a hang. A bounded number of examples
runs by default; `pytest --slow` runs thousands (tests/fuzz_budget.py).
"""

import json

import fuzz_budget
import pytest
from cli_run import error_lines, run_cli
from fuzz_budget import examples
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from layouts import tiny_layout
from test_layout_format_samples import header_bytes_of, index_of, preamble_of, reassemble

RUN = ("run", "-p", "The os module", "-n", "6", "--greedy", "--json", "--budget", "25%ffn", "--strategy", "all")
# derandomized, so a failure fails the same way every run; no shrinking in CI (a shrink is dozens of runs)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.generate, *((Phase.shrink,) if fuzz_budget.SLOW else ())))


class Clean:
    def __init__(self, path):
        self.path = path
        self.blob = path.read_bytes()
        p = preamble_of(self.blob)
        index = index_of(self.blob)
        self.structure = [(0, 128), (p.header_offset, p.header_offset + p.header_length),
                          (p.index_offset, p.index_offset + p.index_length)]
        self.tensors = [(t["offset"], t["offset"] + t["nbytes"], t["dtype"]) for t in index["tensors"]
                        if t["dtype"] != "i32" and t["name"] not in ("embed", "lm_head")]  # used by every token
        self.bundles = [(r["offset"], r["offset"] + r["length"], r["dtype"]) for r in index["layers"]]
        code, out, err = run_cli(*RUN, "-m", path)
        assert code == 0, err
        self.tokens = json.loads(out)["tokens"]
        self.count = 0

    def run(self, blob: bytes) -> tuple[int, list | None, str]:
        self.count += 1
        path = self.path.with_name(f"case-{self.count}.sflash")
        path.write_bytes(blob)
        try:
            code, out, err = run_cli(*RUN, "-m", path, timeout=120)
        finally:
            path.unlink()
        tokens = json.loads(out)["tokens"] if code == 0 else None
        return code, tokens, err


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return Clean(tiny_layout(tmp_path_factory.mktemp("fuzz"), "nemotron", dtype="f16", n_hot=8)[1])


def assert_same_or_one_line(clean, code, tokens, err):
    assert "Traceback" not in err, err
    if code == 0:
        assert tokens == clean.tokens, "silent wrong answer: exit 0 with other tokens"
    else:
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sparseflash: error:"), err


def assert_exit0_or_one_line(code, err):
    assert "Traceback" not in err, err
    if code != 0:
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sparseflash: error:"), err


def _flip(blob: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(blob)
    out[offset] ^= 1 << bit
    return bytes(out)


def _weight_flip(data, ranges):
    """A flip of the top exponent bit of one weight (bit 6 of its top byte in f16, bf16 and f32): a
    weight below 2 in magnitude becomes 2^16 (f16) or more times larger, a change that shows."""
    a, b, dtype = data.draw(st.sampled_from(ranges))
    width = {"f16": 2, "bf16": 2, "f32": 4}[dtype]
    element = data.draw(st.integers(0, (b - a) // width - 1))
    return a + element * width + width - 1, 6


@settings(max_examples=examples(12), **SETTINGS)
@given(data=st.data())
def test_corrupted_bytes_outside_the_weights_are_caught(clean, data):
    if data.draw(st.booleans(), label="truncate"):
        blob = clean.blob[: data.draw(st.integers(0, len(clean.blob) - 1), label="length")]
    else:
        a, b = data.draw(st.sampled_from(clean.structure), label="region")
        blob = _flip(clean.blob, data.draw(st.integers(a, b - 1), label="offset"), data.draw(st.integers(0, 7)))
    code, tokens, err = clean.run(blob)
    assert code == 2  # every structural byte is under a checksum or a bound
    assert_same_or_one_line(clean, code, tokens, err)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)


@settings(max_examples=examples(12), **SETTINGS)
@given(data=st.data())
def test_a_rewritten_header_or_index_is_never_a_crash(clean, data):
    if data.draw(st.booleans(), label="header"):
        header = json.loads(header_bytes_of(clean.blob))
        node = header["model"] if data.draw(st.booleans(), label="model field") else header
        node[data.draw(st.sampled_from(sorted(node)), label="key")] = data.draw(JSON_VALUES, label="value")
        blob = reassemble(clean.blob, header=json.dumps(header).encode())
    else:
        index = index_of(clean.blob)
        entries = index["tensors"] if data.draw(st.booleans(), label="tensor") else index["layers"]
        entry = entries[data.draw(st.integers(0, len(entries) - 1), label="entry")]
        key = data.draw(st.sampled_from(sorted(entry)), label="key")
        entry[key] = data.draw(JSON_VALUES | st.sampled_from([e.get(key) for e in entries]), label="value")
        blob = reassemble(clean.blob, index=json.dumps(index).encode())
    code, _, err = clean.run(blob)
    assert_exit0_or_one_line(code, err)


@settings(max_examples=examples(10), **SETTINGS)
@given(data=st.data())
def test_a_flipped_resident_tensor_is_caught(clean, data):
    offset, bit = _weight_flip(data, clean.tensors)
    assert_same_or_one_line(clean, *clean.run(_flip(clean.blob, offset, bit)))


@settings(max_examples=examples(10), **SETTINGS)
@given(data=st.data())
def test_a_flipped_bundle_is_caught(clean, data):
    offset, bit = _weight_flip(data, clean.bundles)
    assert_same_or_one_line(clean, *clean.run(_flip(clean.blob, offset, bit)))
