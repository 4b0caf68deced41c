"""The import graph: no cycles in our packages, rooms import only downwards, every module imports on its own.

The graph counts every import statement, at module level or inside a function or an `if TYPE_CHECKING:` block:
an import moved into a function still ties the two modules together, it only hides the cycle until run time.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "data_pipeline", "recipes")
# Who may import whom (docs/architecture.md): model/ and data_pipeline/ never reach up, nor into each other.
FORBIDDEN = {
    "model": ("recipes", "data_pipeline", "deepspeed"),
    "data_pipeline": ("recipes", "model", "deepspeed"),
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module named by an import statement in `path`, resolved to the modules of `known` or kept as is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges or nxt == node or nxt in node.split(".")[0:1]:
                continue  # third-party, itself, or a package importing its own __init__
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    ours = set(modules())
    edges = {name: {dep for dep in deps if dep in ours} for name, deps in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_rooms_import_only_downwards():
    bad = [f"{name} imports {dep}" for name, deps in graph().items() for dep in deps
           for room in [name.partition(".")[0]] for other in FORBIDDEN.get(room, ())
           if dep == other or dep.startswith(other + ".")]
    assert not bad, bad


def test_finds_a_planted_cycle():
    """The checker itself: a two-module cycle through a function-level import is reported."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# Each module imported alone: the third-party packages our modules name are loaded once, then a forked child per
# module imports it into an interpreter holding none of our modules (a fresh interpreter per module would pay
# for torch, transformers and DeepSpeed ~60 times).
ALONE = r"""
import importlib, os, sys, traceback
ours, third_party = sys.argv[1].split(","), sys.argv[2].split(",")
for name in third_party:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # optional (flash_attn, ...): the module that needs it must cope, and its child shows whether it does
assert not any(m.split(".")[0] in ("model", "data_pipeline", "recipes") for m in sys.modules)
failures = []
for name in ours:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc(limit=-3).encode()[-2000:])
            code = 1
        os._exit(code)
    os.close(write)
    message = os.read(read, 4000).decode()
    os.close(read)
    if os.waitpid(pid, 0)[1]:
        failures.append(f"{name}: {message}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_alone():
    edges = graph()
    ours = sorted(n for n in edges if not n.endswith("__main__"))
    third_party = sorted({dep for deps in edges.values() for dep in deps
                          if dep and dep.split(".")[0] not in PACKAGES and dep.split(".")[0] != "__future__"})
    proc = subprocess.run([sys.executable, "-c", ALONE, ",".join(ours), ",".join(third_party)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
