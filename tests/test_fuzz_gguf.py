"""Property-based corruption of a small GGUF, run end to end through `sparseflash run`.

GGUF carries no checksums, so a flipped weight or vocabulary byte is a different model that no reader
can tell from the true one; what a reader owes is to never crash or hang on one: every outcome is exit
0, or exit 2 with one line. A truncated file is always refused. A bounded number of examples runs by
default; `pytest --slow` runs thousands (tests/fuzz_budget.py).
"""

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
    code, _, err = run_cli(*RUN, "-m", path)
    assert code == 0, err
    return path, path.read_bytes(), int(GGUFReader(path).data_offset)


def _run(path, blob: bytes) -> tuple[int, str]:
    case = path.with_name("case.gguf")
    case.write_bytes(blob)
    try:
        code, _, err = run_cli(*RUN, "-m", case, timeout=120)
    finally:
        case.unlink()
    return code, err


def assert_exit0_or_one_line(code, err):
    assert "Traceback" not in err, err
    if code != 0:
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sparseflash: error:"), err


@settings(max_examples=examples(15), **SETTINGS)
@given(data=st.data())
def test_a_flipped_gguf_byte_is_never_a_crash(clean, data):
    path, blob, data_offset = clean
    # three in four flips land in the metadata (header, key-values, tensor infos), where parsing happens
    end = data_offset if data.draw(st.integers(0, 3), label="region") else len(blob)
    offset = data.draw(st.integers(0, end - 1), label="offset")
    out = bytearray(blob)
    out[offset] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    assert_exit0_or_one_line(*_run(path, bytes(out)))


@settings(max_examples=examples(8), **SETTINGS)
@given(data=st.data())
def test_a_truncated_gguf_is_refused_in_one_line(clean, data):
    path, blob, _ = clean
    code, err = _run(path, blob[: data.draw(st.integers(0, len(blob) - 1), label="length")])
    assert code == 2
    assert_exit0_or_one_line(code, err)
