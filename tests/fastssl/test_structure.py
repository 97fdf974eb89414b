"""The path from the entry point to the loop reads as short functions (STYLE.md: ~60 lines a function), in
files of at most about 500 lines, and only the builder's modules read the config."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ON_THE_PATH = ["fastssl/train.py", "fastssl/builder.py", "fastssl/run_data.py", "fastssl/run_model.py", "fastssl/engine.py",
               "fastssl/checkpoint.py", "fastssl/methods/base.py"]
LIMIT = 70  # "about 60", a docstring included


@pytest.mark.parametrize("module", ON_THE_PATH)
def test_no_long_function_on_the_path_to_the_loop(module):
    tree = ast.parse((ROOT / module).read_text())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > LIMIT]
    assert not long, f"{module}: {long}"


def test_only_the_builder_its_data_and_model_modules_and_the_config_module_read_the_config():
    readers = sorted(str(path.relative_to(ROOT)) for folder in ("fastssl", "loaders", "kernels")
                     for path in (ROOT / folder).rglob("*.py") if "omegaconf" in path.read_text())
    assert readers == ["fastssl/builder.py", "fastssl/config.py", "fastssl/run_data.py", "fastssl/run_model.py"]
    entry_point = (ROOT / "fastssl/train.py").read_text()
    assert "cfg." not in entry_point  # the entry point hands the config to the builder, reading no key


@pytest.mark.parametrize("module", ON_THE_PATH)
def test_files_on_the_path_stay_short(module):
    assert len((ROOT / module).read_text().splitlines()) <= 500, module
