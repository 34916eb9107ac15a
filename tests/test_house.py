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


@pytest.mark.parametrize("name", ["extract", "cluster", "evaluate", "report"])
def test_every_stage_room_exposes_run_and_is_done(name):
    from rep_pipeline.stages import STAGES

    room = STAGES[name].room()
    assert callable(getattr(room, f"run_{name}")) and callable(room.is_done)
