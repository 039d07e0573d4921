"""Imports flow one way: cli -> {eval, qat, formats} -> quant (house style §1)."""
import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "k2quant"
FORBIDDEN = {
    "quant": ("k2quant.formats", "k2quant.qat", "k2quant.eval", "k2quant.cli", "k2quant.data"),
    "formats": ("k2quant.qat", "k2quant.eval", "k2quant.cli"),
    "qat": ("k2quant.formats", "k2quant.eval", "k2quant.cli", "k2quant.qat_run"),
    "eval": ("k2quant.qat", "k2quant.cli"),
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_import_direction():
    bad = []
    for sub, forbidden in FORBIDDEN.items():
        for f in (PKG / sub).rglob("*.py"):
            bad += [f"{f.relative_to(PKG)} imports {n}" for n in imports(f) if n.startswith(forbidden)]
    for f in PKG.rglob("*.py"):
        if not f.name.startswith("cli") and f.name != "__main__.py":
            bad += [f"{f.relative_to(PKG)} imports {n}" for n in imports(f) if n.startswith("k2quant.cli")]
    assert not bad, bad


def test_quant_uses_only_torch_and_stdlib():
    for f in (PKG / "quant").rglob("*.py"):
        # the compiled CPU kernels alone use numba (a dependency; dispatch falls back to torch if it cannot load)
        allowed = set(sys.stdlib_module_names) | {"torch", "k2quant"} | ({"numba", "numpy"} if f.name == "fast.py" else set())
        for n in imports(f):
            root = n.split(".")[0]
            assert root in allowed, f"{f.name} imports {n}"
            if root == "k2quant":
                assert n.startswith(("k2quant.quant", "k2quant.errors")), f"{f.name} imports {n}"
