"""The house: where modules live, which way imports flow, and a command line that starts without torch."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "k2quant"
TOP_LEVEL = {"__init__.py", "__main__.py", "errors.py", "py.typed"}  # entry points only
QAT_CORE = ("fake_quant", "wrap", "weights")
#: package (or module) -> what it must not import
FORBIDDEN = {
    "quant": ("k2quant.formats", "k2quant.qat", "k2quant.eval", "k2quant.cli"),
    "formats": ("k2quant.qat", "k2quant.eval", "k2quant.cli"),
    "qat": ("k2quant.eval", "k2quant.cli"),
    "eval": ("k2quant.qat", "k2quant.cli"),
}
QAT_WORKFLOW = tuple(f"k2quant.qat.{m}" for m in ("config", "data", "model", "masters", "losses", "dist", "state",
                                                  "export", "train"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every k2quant module ``path`` imports, at the top or inside a function (a lazy import is an import)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    modules = {module_name(p) for p in PKG.rglob("*.py")}
    return {n for n in names if n in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in PKG.rglob("*.py")}


def test_only_entry_points_at_the_top():
    assert {p.name for p in PKG.iterdir() if p.is_file()} <= TOP_LEVEL
    assert {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "cli", "eval", "formats", "qat", "quant"}


def test_import_direction():
    bad = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        forbidden = FORBIDDEN.get(rel.parts[0], ()) if len(rel.parts) > 1 else ()
        if rel.parts[0] == "qat" and f.stem in QAT_CORE:
            forbidden = (*forbidden, "k2quant.formats", *QAT_WORKFLOW)  # the core: torch and quant only
        if rel.parts[0] != "cli" and f.name != "__main__.py":
            forbidden = (*forbidden, "k2quant.cli")
        bad += [f"{rel} imports {n}" for n in imports(f) if n.startswith(forbidden)]
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    # a package's __init__ importing its own submodules is not a cycle of theirs
    g = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in g.items()}
    seen, stack, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(g.get(m, ())):
            visit(n)
        stack.pop()

    for m in sorted(g):
        visit(m)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_quant_uses_only_torch_and_stdlib():
    for f in (PKG / "quant").rglob("*.py"):
        # the compiled CPU kernels alone use numba (a dependency; dispatch falls back to torch if it cannot load),
        # and llvmlite, the code generator numba pins and installs, for an intrinsic (a prefetch)
        allowed = set(sys.stdlib_module_names) | {"torch", "k2quant"} | \
            ({"numba", "numpy", "llvmlite"} if f.name == "fast.py" else set())
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for n in names:
                assert n.split(".")[0] in allowed, f"{f.name} imports {n}"
                if n.startswith("k2quant"):
                    assert n.startswith(("k2quant.quant", "k2quant.errors")), f"{f.name} imports {n}"


def test_command_line_starts_without_the_numeric_stack():
    """``k2quant --help`` and every ``k2quant CMD --help`` import neither torch nor transformers."""
    code = ("import sys; from click.testing import CliRunner; from k2quant.cli import main\n"
            "for args in [['--help']] + [[c, '--help'] for c in main.commands] + [['qat', 'train', '--help']]:\n"
            "    r = CliRunner().invoke(main, args); assert r.exit_code == 0, (args, r.output)\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numba', 'safetensors', 'accelerate') if m in sys.modules)\n"
            "print(' '.join(sorted(main.commands))); print('heavy:', heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    commands, heavy = res.stdout.strip().splitlines()
    assert commands == "convert diff eval inspect make-tiny plan qat verify"
    assert heavy == "heavy: []"
