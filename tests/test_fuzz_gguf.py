"""Property-based corruption of a small GGUF, run end to end through `sparseflash run`.

A flip in the file's structure (header, key names, value types, string and array lengths, tensor
names, shapes, types and offsets) must be caught: exit 0 with the clean file's tokens, or exit 2 with
one line. GGUF carries no checksums, so a flipped weight, vocabulary string or hyperparameter value is
a different model that no reader can tell from the true one (an epsilon of 2e-5 instead of 1e-5 is
plausible); what a reader owes there is to never crash or hang: exit 0, or exit 2 with one line. A
truncated file is always refused. A bounded number of examples runs by default; `pytest --slow` runs
thousands (tests/fuzz_budget.py).
"""

import json

import fuzz_budget
import pytest
from cli_run import error_lines, run_cli
from fuzz_budget import examples
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tiny_models import make_hf_model, save_hf_model

from sparseflash.model.gguf_export import export_gguf

RUN = ("run", "-p", "The os module", "-n", "4", "--greedy", "--json")
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.generate, *((Phase.shrink,) if fuzz_budget.SLOW else ())))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    from gguf import GGUFReader

    tmp = tmp_path_factory.mktemp("fuzz-gguf")
    ckpt = save_hf_model(make_hf_model("nemotron-tied"), tmp / "ckpt")
    path = export_gguf(ckpt, tmp / "clean.gguf", "f16").path
    code, out, err = run_cli(*RUN, "-m", path)
    assert code == 0, err
    reader = GGUFReader(path)
    base = reader.data.ctypes.data
    values = sorted((p.ctypes.data - base, p.ctypes.data - base + p.nbytes)  # key-value payloads (not GGUF.*)
                    for name, field in reader.fields.items() if not name.startswith("GGUF.")
                    for p in (field.parts[i] for i in field.data))
    structure, end = [], 0
    for a, b in values:
        if a > end:
            structure.append((end, a))
        end = max(end, b)
    structure.append((end, int(reader.data_offset)))
    return path, path.read_bytes(), structure, values + [(int(reader.data_offset), path.stat().st_size)], \
        json.loads(out)["tokens"]


def _run(path, blob: bytes) -> tuple[int, list | None, str]:
    case = path.with_name("case.gguf")
    case.write_bytes(blob)
    try:
        code, out, err = run_cli(*RUN, "-m", case, timeout=120)
    finally:
        case.unlink()
    return code, json.loads(out)["tokens"] if code == 0 else None, err


def assert_exit0_or_one_line(code, err):
    assert "Traceback" not in err, err
    if code != 0:
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sparseflash: error:"), err


def _flipped(data, blob: bytes, ranges) -> bytes:
    a, b = data.draw(st.sampled_from(ranges), label="range")
    out = bytearray(blob)
    out[data.draw(st.integers(a, b - 1), label="offset")] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    return bytes(out)


@settings(max_examples=examples(15), **SETTINGS)
@given(data=st.data())
def test_a_flipped_structure_byte_is_caught(clean, data):
    path, blob, structure, _, tokens = clean
    code, got, err = _run(path, _flipped(data, blob, structure))
    assert_exit0_or_one_line(code, err)
    assert code != 0 or got == tokens, "silent wrong answer: exit 0 with other tokens"


@settings(max_examples=examples(8), **SETTINGS)
@given(data=st.data())
def test_a_flipped_value_or_weight_is_never_a_crash(clean, data):
    path, blob, _, values, _ = clean
    code, _, err = _run(path, _flipped(data, blob, values))
    assert_exit0_or_one_line(code, err)


@settings(max_examples=examples(8), **SETTINGS)
@given(data=st.data())
def test_a_truncated_gguf_is_refused_in_one_line(clean, data):
    path, blob = clean[:2]
    code, _, err = _run(path, blob[: data.draw(st.integers(0, len(blob) - 1), label="length")])
    assert code == 2
    assert_exit0_or_one_line(code, err)
