"""The house rules: one import root, layers that never import upward, one owner per library."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LAYERS = ["storage_schemas", "pipeline", "stages", "cli"]  # each may import only those before it
OWNERS = {  # third-party libraries that exactly one module (or package: a folder, any module under it) may import
    "zarr": "pipeline/store/",
    "duckdb": "pipeline/results.py",
    "pyarrow.parquet": "pipeline/parquet.py",
    "ray": "pipeline/runner.py",
    "cupy": "pipeline/backend.py",
    "cupyx": "pipeline/backend.py",
    "obstore": "pipeline/location.py",
}


def _modules():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            yield layer, path


def _imports(path: Path) -> list[str]:
    """Absolute names of everything ``path`` imports, at any depth (function-level too)."""
    package = ".".join(["rep_pipeline", *path.relative_to(ROOT).with_suffix("").parts])
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def _layer_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "rep_pipeline" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for layer, path in _modules():
        for name in _imports(path):
            other = _layer_of(name)
            if other is not None and LAYERS.index(other) > LAYERS.index(layer):
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
            if name.startswith("rep_pipeline.") and other is None and name != "rep_pipeline.__version__":
                upward.append(f"{path.relative_to(ROOT)} imports {name} from the root")
    assert upward == []


def test_stage_rooms_do_not_import_each_other():
    crossing = []
    for layer, path in _modules():
        if layer != "stages" or path.parent == ROOT / "stages":
            continue
        room = path.relative_to(ROOT / "stages").parts[0]
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["rep_pipeline", "stages"] and len(parts) > 2 and parts[2] != room:
                crossing.append(f"{path.relative_to(ROOT)} imports {name}")
    assert crossing == []


def test_each_library_is_touched_by_one_module():
    found = []
    for _, path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        for name in _imports(path):
            for lib, owner in OWNERS.items():
                if (name == lib or name.startswith(lib + ".")) and rel != owner and not (
                        owner.endswith("/") and rel.startswith(owner)):
                    found.append(f"{rel} imports {name} (only {owner} may)")
    assert found == []


def test_storage_schemas_are_data_only():
    io = {"zarr", "duckdb", "pyarrow.parquet", "ray", "torch", "numpy", "os", "shutil", "pathlib.Path"}
    for path in (ROOT / "storage_schemas").rglob("*.py"):
        text = path.read_text()
        assert "open(" not in text, path
        assert not [n for n in _imports(path) if n.split(".")[0] in io or n in io], path  # PurePath is fine


def test_installed_under_one_import_root_from_outside_the_repository(tmp_path):
    code = """
import importlib, json
import rep_pipeline
out = {"version": rep_pipeline.__version__,
       "public": [callable(getattr(rep_pipeline, n)) for n in ("run_extract", "run_cluster", "run_evaluate",
                  "run_report", "run_all", "ExtractConfig", "ClusterConfig", "EvaluateConfig", "ReportConfig")]}
for name in ("pipeline", "stages", "cli", "storage_schemas"):
    try:
        importlib.import_module(name)
        out[name] = "imported"
    except ImportError:
        out[name] = "missing"
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    import json

    out = json.loads(result.stdout)
    assert out["version"] and all(out["public"])
    assert {k: out[k] for k in ("pipeline", "stages", "cli", "storage_schemas")} == dict.fromkeys(
        ("pipeline", "stages", "cli", "storage_schemas"), "missing")


def test_importing_the_root_and_the_cli_loads_neither_torch_nor_ray(tmp_path):
    code = "import sys, rep_pipeline.cli.app; print(sorted({'torch', 'ray', 'zarr'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_package_folder_is_installed():
    """pyproject lists the packages by hand (the root maps onto the repository): none missing."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(["rep_pipeline", *p.parent.relative_to(ROOT).parts])
             for layer in LAYERS for p in (ROOT / layer).rglob("__init__.py")}
    assert found | {"rep_pipeline"} == listed


def _stage_names() -> list[str]:
    from rep_pipeline.stages import STAGES

    return list(STAGES)


@pytest.mark.parametrize("name", _stage_names())
def test_every_stage_room_exposes_run_and_is_done(name):
    """Every registered stage, not a hand-kept list: a new entry in ``STAGES`` is checked too."""
    from rep_pipeline.stages import STAGES

    room = STAGES[name].room()
    assert callable(getattr(room, f"run_{name}", None)), f"stages/{name} has no run_{name}"
    assert callable(getattr(room, "is_done", None)), f"stages/{name} has no is_done"


def _module_name(path: Path) -> str:
    parts = ["rep_pipeline", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """Every module of the package (the root ``__init__`` too) -> the package's modules it
    imports, at any depth (function-level imports count). ``import a.b`` and ``from a.b import
    x`` point at ``a.b`` (a package's ``__init__``) unless ``a.b.x`` is a module itself; the
    parents that Python loads first are not counted, else every package would cycle with its
    own submodules."""
    files = [ROOT / "__init__.py", *(path for _, path in _modules())]
    modules = {_module_name(path): path for path in files}

    def resolve(name: str | None) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                targets |= {f"{module}.{a.name}" if f"{module}.{a.name}" in modules else resolve(module)
                            for a in node.names}
        graph[name] = targets - {None, name}
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a component of two or more


def test_cycle_finder_sees_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(c for c in _strongly_connected(graph) if len(c) > 1) == [["a", "b", "c"]]
    assert _one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_cycles_lazy_imports_included():
    """No two modules of the package import each other, directly or around a loop, even from
    inside a function (a lazy import hides a cycle, it does not remove it)."""
    graph = _module_graph()
    assert "rep_pipeline.pipeline.datasets.registry" in graph  # the walk reached the package's modules
    cycles = [" -> ".join(_one_cycle(graph, c)) + f"  (component: {', '.join(c)})"
              for c in _strongly_connected(graph) if len(c) > 1]
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_stages_neither_import_zarr_nor_read_attrs():
    """The stages see the store through typed metadata of ``pipeline/store``: no module under
    ``stages/`` imports zarr or reads an ``.attrs`` mapping (or calls an ``.attrs(...)`` method)."""
    found = []
    for layer, path in _modules():
        if layer != "stages":
            continue
        rel = path.relative_to(ROOT).as_posix()
        found += [(rel, 0, f"imports {name}") for name in _imports(path) if name.split(".")[0] == "zarr"]
        found += [(rel, node.lineno, "reads .attrs") for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Attribute) and node.attr == "attrs"]
    assert found == [], "\n".join(f"{rel}:{line} {what}" for rel, line, what in sorted(set(found)))


def test_no_test_file_imports_another_or_conftest():
    """Test files share builders as fixtures of ``tests/conftest.py``: none imports a test
    module or conftest itself (pytest loads conftest; an import of it runs it twice)."""
    tests = ROOT / "tests"
    local = {p.stem for p in tests.rglob("*.py") if p.stem.startswith("test_") or p.stem == "conftest"}
    found = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and node.level:
                names = [node.module or "", *(a.name for a in node.names)]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in local or n.split(".")[:1] == ["tests"]]
    assert found == [], "\n".join(found)
