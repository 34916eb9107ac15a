"""Hostile or broken YAML in a run config or an option value: refused in one or two lines that
name the file, the line and the key, in bounded time and memory (PyYAML's Python tags stay
refused)."""
import subprocess
import sys

import pytest

LAUGHS = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10))

CASES = {
    "billion laughs": (LAUGHS, "expands to more than 100,000 values"),
    "a key given twice": ("title: x\nstore: a.zarr\ntitle: y\n", "line 3: key 'title' given twice (first on line 1)"),
    "a 5,000-digit integer": ("title: x\nlimit: " + "9" * 5000 + "\n", "line 2: a number of 5000 characters"),
    "nested thousands of levels": ("title: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than 64 levels deep"),
    "a Python tag": ("title: !!python/object/apply:os.system [echo hi]\n", "could not determine a constructor"),
}


def _run(tmp_path, *args):
    """`rep-pipeline ...` with its memory capped at 2 GB, so a blow-up fails instead of swapping."""
    cap = "import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
    code = cap + "import sys; from rep_pipeline.cli.app import main; sys.argv = ['rep-pipeline', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_run_config_is_refused_naming_file_and_line(tmp_path, case):
    text, message = CASES[case]
    path = tmp_path / "run.yaml"
    path.write_text(text)
    run = _run(tmp_path, "run", str(path))
    assert run.returncode == 2, run.stderr[-1500:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and str(path) in run.stderr and message in run.stderr, run.stderr[-1500:]
    assert "unexpected" not in run.stderr.lower()


def test_a_binary_file_is_refused_as_not_text(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    run = _run(tmp_path, "run", str(path))
    assert run.returncode == 2 and f"{path}: not a UTF-8 text file" in run.stderr, run.stderr


def test_a_huge_file_is_refused_from_its_size(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# padding\n" * 200_000)
    run = _run(tmp_path, "run", str(path))
    assert run.returncode == 2 and "more than a config file's" in run.stderr, run.stderr


def test_a_hostile_option_value_is_refused_by_its_key(tmp_path):
    run = _run(tmp_path, "extract", "--model", "tiny-vit", "--weights", "random", "--store", str(tmp_path / "s.zarr"),
               "-o", "sizes=" + "9" * 5000)
    assert run.returncode == 2 and "option sizes" in run.stderr and "a number of 5000 characters" in run.stderr, \
        run.stderr


def test_merge_keys_and_several_documents_still_load(tmp_path):
    from rep_pipeline.pipeline.yaml_files import load_documents

    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {k: 1, j: 2}\nother:\n  <<: *b\n  k: 3\n---\nsecond: true\n")
    assert load_documents(path) == [{"base": {"k": 1, "j": 2}, "other": {"k": 3, "j": 2}}, {"second": True}]
