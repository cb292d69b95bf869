"""The import graph follows the data flow: checkpoint -> profile -> predictors + order -> layout file
-> runtime -> reports. Checked on the source, so a stray import fails here, not in review."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparseflash"
CONTAINER = {"sparseflash.layout.format", "sparseflash.layout.format_spec", "sparseflash.layout.format_index",
             "sparseflash.layout.format_reader", "sparseflash.layout.format_writer",
             "sparseflash.layout.format_extents"}
CONTRACT = CONTAINER | {"sparseflash.layout.schema", "sparseflash.layout.schema_check", "sparseflash.layout.schema_gate",
                        "sparseflash.layout.schema_cache"}
NEUTRAL = {"sparseflash", "sparseflash.errors", "sparseflash.units", "sparseflash.paths"}


def _imports(path: Path) -> set[str]:
    """Absolute names of the sparseflash modules a file imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                out.add(sub if is_module else base)
    return {name for name in out if name == "sparseflash" or name.startswith("sparseflash.")}


def _files(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def _violations(sub: str, allowed) -> list[str]:
    return [f"{p.relative_to(PACKAGE)} imports {name}" for p in _files(sub) for name in sorted(_imports(p))
            if not allowed(name)]


def _under(name: str, *packages: str) -> bool:
    return any(name == f"sparseflash.{p}" or name.startswith(f"sparseflash.{p}.") for p in packages)


def test_kernels_import_nothing_else_of_the_package():
    assert _violations("kernels", lambda n: _under(n, "kernels")) == []


def test_format_and_schema_import_only_each_other():
    bad = [f"{p.name} imports {n}" for p in (PACKAGE / "layout").glob("*.py")
           if p.stem.startswith(("format", "schema"))
           for n in sorted(_imports(p)) if n not in CONTRACT]
    assert bad == []


def test_model_imports_no_later_stage():
    # kernels/ is a leaf (arrays in, arrays out): the forward's native decode step uses it
    assert _violations("model", lambda n: n in NEUTRAL or _under(n, "model", "kernels")) == []


def test_layout_imports_neither_runtime_nor_eval():
    assert _violations("layout", lambda n: not _under(n, "runtime", "eval", "tools")) == []


def test_runtime_imports_only_the_format_and_schema_of_layout():
    assert _violations("runtime", lambda n: not _under(n, "eval", "tools")
                       and (not _under(n, "layout") or n in CONTRACT)) == []


def test_eval_imports_no_command_line_code():
    assert _violations("eval", lambda n: not _under(n, "tools")) == []


@pytest.mark.parametrize("sub", ["model", "layout", "runtime", "kernels", "eval", "tools"])
def test_files_stay_readable_in_one_sitting(sub):
    long = [f"{p.relative_to(PACKAGE)}: {n} lines" for p in _files(sub)
            if (n := len(p.read_text().splitlines())) > 400]
    assert long == []
