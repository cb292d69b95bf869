"""Test session setup: numba.cuda runs on its simulator unless SPARSEFLASH_REAL_CUDA=1.

Numba reads NUMBA_ENABLE_CUDASIM when numba.cuda is first imported, so it is set here,
before any test module loads. It changes nothing for CPU (njit) code.
"""

import os

if os.environ.get("SPARSEFLASH_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# Device-model probes and prepared layouts made by tests go to a throwaway cache, not ~/.cache.
if "SPARSEFLASH_CACHE" not in os.environ:
    import tempfile

    os.environ["SPARSEFLASH_CACHE"] = tempfile.mkdtemp(prefix="sparseflash-test-cache-")


# ---- sample .sflash files for the format's corruption tests (test_layout_format_corrupt/_fuzz.py) ----

import pytest  # noqa: E402


class _Blob(bytes):
    """File bytes that print as their size (hypothesis shows fixture values on failure)."""

    def __repr__(self):
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("corrupt")


@pytest.fixture(scope="module")
def raw_blob(workdir):
    from test_layout_format_samples import build_sample

    return _Blob(open(build_sample(workdir / "raw.sflash").path, "rb").read())


@pytest.fixture(scope="module")
def zstd_blob(workdir):
    from test_layout_format_samples import build_sample

    return _Blob(open(build_sample(workdir / "zstd.sflash", zstd_level=3).path, "rb").read())


@pytest.fixture(scope="module")
def golden_blob(workdir):
    from test_layout_format_samples import build_golden

    build_golden(workdir / "golden.sflash")
    return _Blob(open(workdir / "golden.sflash", "rb").read())


# ---- `pytest --slow`: slow tests, and thousands of examples in the fuzz tests (test_fuzz_*.py) ----

def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run tests marked slow, and the fuzz tests with thousands of examples")


def pytest_configure(config):
    import fuzz_budget

    config.addinivalue_line("markers", "slow: long-running; runs only with --slow")
    fuzz_budget.SLOW = bool(config.getoption("--slow"))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
