"""The floor plan, enforced: imports run one way, there is no circle, and the install is one name.

Layers, bottom to top (docs/architecture.md):
    core (dataops/)  <-  tasks/ (shared ground, then wings)  <-  flows/  <-  deployments/  <-  dev/  <-  cli/
A module may import its own layer and the layers below it. Inside tasks/, the shared ground
(the modules at the top of tasks/) imports no wing. Every import is read, those inside
functions too: an import that is deferred still runs the wrong way.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# folder -> (dotted package, rank)
LAYERS = {"dataops": ("dataops", 0), "tasks": ("dataops.tasks", 1), "flows": ("dataops.flows", 2),
          "deployments": ("dataops.deployments", 3), "dev": ("dataops.dev", 4), "cli": ("dataops.cli", 5)}
GENERIC = {"tasks", "flows", "deployments", "cli", "dev"}  # never importable by these names
WINGS = {"backup", "migration", "transform", "anonymize", "refresh", "validation"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, (package, _) in LAYERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def layer_of(module: str) -> tuple[str, int]:
    best = ("dataops", 0)
    for _, (package, rank) in LAYERS.items():
        if (module == package or module.startswith(package + ".")) and len(package) >= len(best[0]):
            best = (package, rank)
    return best


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of ours in the file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from dataops.tasks import pg` imports the module dataops.tasks.pg
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def edges(mods: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(importer, line, imported) between our modules, and imports by a generic top-level name."""
    found = []
    for module, path in mods.items():
        for line, name in imports_of(path, module):
            top = name.split(".")[0]
            if top in GENERIC:
                found.append((module, line, name))
            elif name in mods:
                found.append((module, line, name))
    return found


def test_every_folder_of_the_design_has_modules():
    mods = modules()
    for folder, (package, _) in LAYERS.items():
        assert any(m == package or m.startswith(package + ".") for m in mods), folder
    assert {m.split(".")[2] for m in mods if m.startswith("dataops.tasks.") and "." in m[len("dataops.tasks."):]} == WINGS


def test_no_import_by_a_generic_top_level_name():
    bad = [f"{mods_path(m)}:{line} imports {name}" for m, line, name in edges(modules())
           if name.split(".")[0] in GENERIC]
    assert not bad, "import through dataops.<layer>, never a generic top-level name:\n" + "\n".join(bad)


def mods_path(module: str) -> str:
    return str(modules()[module].relative_to(REPO))


def test_imports_run_one_way():
    mods = modules()
    bad = []
    for importer, line, name in edges(mods):
        if name.split(".")[0] in GENERIC:
            continue
        (src_pkg, src_rank), (dst_pkg, dst_rank) = layer_of(importer), layer_of(name)
        where = f"{mods[importer].relative_to(REPO)}:{line} imports {name}"
        if dst_rank > src_rank:
            bad.append(f"{where} ({src_pkg} may not import the layer above it, {dst_pkg})")
        elif src_pkg == dst_pkg == "dataops.tasks":
            src_wing, dst_wing = _wing(importer), _wing(name)
            if src_wing is None and dst_wing is not None:
                bad.append(f"{where} (the shared ground of tasks/ imports no wing)")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[2] in WINGS else None


def test_no_circle_between_modules():
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for importer, _, name in edges(mods):
        if name in mods and name != importer and not _is_parent(name, importer):
            graph[importer].add(name)
    circles = _strongly_connected(graph)
    assert not circles, "circles of imports:\n" + "\n".join(" -> ".join(sorted(c)) for c in circles)


def _is_parent(package: str, module: str) -> bool:
    """Importing a module runs its package's __init__: that is not an edge of the plan."""
    return module.startswith(package + ".")


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
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
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    """The checks above can fail: a task module that imports a flow, and two modules that import
    each other, are both reported."""
    fake = tmp_path / "repo"
    for folder in LAYERS:
        (fake / folder).mkdir(parents=True)
    (fake / "flows" / "f.py").write_text("import dataops.tasks.t\n")
    (fake / "tasks" / "t.py").write_text("def g():\n    from dataops.flows import f\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake)
    mods = modules()
    found = edges(mods)
    assert ("dataops.tasks.t", 2, "dataops.flows.f") in found
    with pytest.raises(AssertionError, match="may not import the layer above"):
        test_imports_run_one_way()
    with pytest.raises(AssertionError, match="circles"):
        test_no_circle_between_modules()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources, so that setuptools' build/ folder stays out of the checkout."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", *LAYERS):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)], check=True,
                   capture_output=True, timeout=300)
    return next(out.glob("dataops-*.whl"))


def test_the_wheel_installs_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dataops"}, tops
    # every module of the design is in it, under its layer's name
    for module in modules():
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module
    assert "dataops/deployments/prefect.yaml" in names


def test_a_plain_install_pulls_neither_moto_nor_pgserver(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    plain = [r for r in requires if "extra ==" not in r]
    assert plain and not [r for r in plain if r.lower().startswith(("moto", "pgserver"))], plain
    dev = [r for r in requires if "extra == \"dev\"" in r]
    assert any(r.startswith("pgserver") for r in dev) and any(r.startswith("moto") for r in dev), dev
