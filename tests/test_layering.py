"""The package's layering: imports go one way, data -> models -> agent -> run -> eval -> env -> train -> cli.

Every import in every module counts, the lazy ones inside functions too: a function-level import is a
dependency all the same, only a later one. A module may import its own layer and the layers below it;
the import graph has no cycle. A new module must be placed in a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a name matches the module itself and everything below it (``worldflow.data`` covers
# ``worldflow.data.video``)
LAYERS: list[tuple[str, ...]] = [
    ("worldflow", "worldflow.config", "worldflow.rng", "worldflow.precision", "worldflow.io",
     "worldflow.argtypes", "worldflow.flow", "worldflow.state", "worldflow.checkpoint", "worldflow.errors",
     "worldflow.envs"),  # foundations: no model code
    ("worldflow.nn",),  # transformer maths
    ("worldflow.distributed",),  # process groups, the row split every model-side draw uses
    ("worldflow.data",),  # video I/O, episodes, action spaces, clips, collection
    ("worldflow.tokenizer",),
    ("worldflow.dynamics",),
    ("worldflow.agent",),  # heads, distributions, imagination
    ("worldflow.run",),  # a run directory and its trained pieces
    ("worldflow.eval",),
    ("worldflow.gym_env",),  # the world model as a gymnasium env
    ("worldflow.train",),
    ("worldflow.cli", "worldflow.play"),  # front ends: the command line and the browser game
]


def modules() -> dict[str, Path]:
    """Module name -> file, for worldflow/ and envs/ (installed as worldflow.envs)."""
    out = {}
    for base, pkg in ((ROOT / "worldflow", "worldflow"), (ROOT / "envs", "worldflow.envs")):
        for p in sorted(base.rglob("*.py")):
            parts = p.relative_to(base).with_suffix("").parts
            name = ".".join((pkg, *parts))
            out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The worldflow modules ``name`` imports (a ``from m import x`` counts as m.x when that is a module)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            for a in node.names:
                full = f"{mod}.{a.name}"
                found.add(full if full in known else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (name == n or name.startswith(n + ".")) and n.count(".") > depth:
                best, depth = i, n.count(".")
    assert best is not None, f"{name} is in no layer: add it to LAYERS in tests/test_layering.py"
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_imports_only_go_down():
    bad = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
           for a, deps in graph().items() for b in sorted(deps)
           if layer_of(b) > layer_of(a) and not (b == "worldflow" or a.startswith(b + "."))]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    # a package's __init__ re-exporting its submodules is not a dependency of those submodules on it
    g = {a: {b for b in deps if not (a.startswith(b + ".") and b != "worldflow")} for a, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_the_checker_catches_a_violation(tmp_path):
    """The rule itself: an upward import is reported (so the test cannot pass vacuously)."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from worldflow.cli.app import main\n")
    deps = imports("worldflow.data.m", p, {"worldflow.cli.app", "worldflow.data.m"})
    assert deps == {"worldflow.cli.app"} and layer_of("worldflow.cli.app") > layer_of("worldflow.data.m")
