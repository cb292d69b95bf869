"""How many examples the fuzz tests draw: a bounded number by default (CI), thousands with `pytest --slow`
(tests/conftest.py sets SLOW before the test modules are imported)."""

SLOW = False


def examples(default: int, slow: int = 2000) -> int:
    return slow if SLOW else default
