"""Every packaged config loads, names its run command in its docstring, and the repository's
`configs/` recipes are the same configs as the packaged ones."""

import ast
import os

import pytest

from speechverse_jax import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", configs.names())
def test_packaged_config_loads_and_documents_its_command(name):
    path = os.path.join(configs.PACKAGE_DIR, f"{name}.py")
    doc = ast.get_docstring(ast.parse(open(path).read()))
    assert doc and "speechverse-jax " in doc, f"{name}: the docstring must give the command that runs it"
    arg = {"prepare": "librispeech"}.get(name)
    config = configs.load(name, arg)
    assert len(config) > 0


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")))
def test_repo_recipes_equal_the_packaged_configs(name):
    from_file = configs.load(os.path.join(REPO, "configs", f"{name}.py"))
    assert from_file.to_dict() == configs.load(name).to_dict()


def test_a_name_or_a_path_resolves_and_a_wrong_one_is_named():
    assert configs.resolve("stage1:weighted").endswith(os.path.join("configs", "stage1.py") + ":weighted")
    assert configs.load("stage1", "weighted").model.layer_combination == "weighted"
    with pytest.raises(FileNotFoundError, match="stage7"):
        configs.resolve("stage7")
    with pytest.raises(FileNotFoundError, match="nothere.py"):
        configs.resolve("nothere.py")


def test_a_folder_named_like_a_config_does_not_hide_it(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()  # e.g. the output folder of `speechverse-jax demo --out demo`
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("demo") == os.path.join(configs.PACKAGE_DIR, "demo.py")
