"""House rules read from the source with ``ast`` (no imports, no grep): who may import what.

- no module of ``ensembler/`` imports a private (``_name``) from another module;
- no import cycles among ``ensembler/`` modules, counting imports inside functions;
- ``infer`` and ``ensemble`` are siblings: neither imports the other (both speak ``ensembler.logits``);
- nothing imports ``ensembler.cli``;
- ``np.savez``/``np.load`` (logits on disk) appear only in ``ensembler/logits.py``;
- no file of ``ensembler/`` is longer than 500 lines.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ensembler"
MAX_LINES = 500

@lru_cache(maxsize=1)
def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


@lru_cache(maxsize=None)
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name][0].read_text(encoding="utf-8"))


def _absolute(name: str, is_pkg: bool, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


@lru_cache(maxsize=1)
def imports() -> dict[str, list[tuple[str, str | None, int]]]:
    """Module -> [(imported module, imported name or None, line)], function-local imports included."""
    mods = modules()
    out: dict[str, list] = {}
    for name, (_, is_pkg) in mods.items():
        found = []
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(name, is_pkg, node.level, node.module)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub, None, node.lineno) if sub in mods else (target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                found.extend((alias.name, None, node.lineno) for alias in node.names)
        out[name] = [f for f in found if f[0] == "ensembler" or f[0].startswith("ensembler.")]
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_rules_see_the_package():
    mods = modules()
    assert "ensembler.logits" in mods and "ensembler.registry.index" in mods and len(mods) > 40
    assert ("ensembler.logits", "Logits", 1) not in imports()["ensembler.infer.store"]  # line numbers are real
    assert any(t == "ensembler.logits" for t, _, _ in imports()["ensembler.infer.store"])


def test_no_module_imports_a_private_name_of_another():
    found = {(mod, imported) for mod, items in imports().items() for target, imported, _ in items
             if imported is not None and _is_private(imported) and target != mod}
    assert not found, f"private names imported from another module: {sorted(found)}"


def _cycles() -> list[frozenset[str]]:
    mods = modules()
    graph = {m: {t for t, _, _ in items if t in mods and t != m} for m, items in imports().items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_counting_function_local_imports():
    found = sorted(sorted(c) for c in _cycles())
    assert not found, f"import cycles: {found}"


def test_infer_and_ensemble_are_siblings_and_nothing_imports_cli():
    for mod, items in imports().items():
        targets = {t for t, _, _ in items}
        for a, b in (("ensembler.infer", "ensembler.ensemble"), ("ensembler.ensemble", "ensembler.infer")):
            if mod == a or mod.startswith(a + "."):
                assert not {t for t in targets if t == b or t.startswith(b + ".")}, f"{mod} imports {b}"
        if not (mod in ("ensembler.cli", "ensembler.__main__") or mod.startswith("ensembler.cli.")):
            assert not {t for t in targets if t.startswith("ensembler.cli")}, f"{mod} imports ensembler.cli"


def test_logits_files_are_read_and_written_only_by_ensembler_logits():
    found = []
    for mod in modules():
        for node in ast.walk(tree(mod)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("savez", "savez_compressed", "load", "save")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy")):
                found.append((mod, node.func.attr, node.lineno))
    assert found and all(mod == "ensembler.logits" for mod, _, _ in found), \
        f"np.savez/np.load outside ensembler/logits.py: {[f for f in found if f[0] != 'ensembler.logits']}"


def test_no_file_over_500_lines():
    lengths = {str(p.relative_to(PACKAGE.parent)): len(p.read_text(encoding="utf-8").splitlines())
               for p, _ in modules().values()}
    long = sorted(f for f, n in lengths.items() if n > MAX_LINES)
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_ray_is_imported_only_inside_functions_of_the_executors():
    """Nothing imports ray unless a Ray executor asks for it: no module-level ``import ray``
    anywhere, and function-local ones only in ``ensembler.executors``."""
    found = []
    for mod in modules():
        body_level = {id(n) for n in tree(mod).body}
        for node in ast.walk(tree(mod)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.append((mod, node.lineno, id(node) in body_level))
    assert found, "the rule sees no ray import at all"
    assert not [f for f in found if f[2]], f"module-level ray imports: {[f for f in found if f[2]]}"
    outside = [f for f in found if not f[0].startswith("ensembler.executors")]
    assert not outside, f"ray imported outside ensembler.executors: {outside}"


def test_importing_every_module_does_not_import_ray():
    import subprocess
    import sys

    names = sorted(m for m in modules() if m != "ensembler.__main__")
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "importing ensembler imported ray"
