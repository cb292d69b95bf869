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
