"""Every config key the code reads exists in the config that feeds it, and no reader carries its own
default (`.get(key, default)` on a config): one place per default."""

import ast
import glob
import os

import ml_collections
import pytest

from speechverse_jax.configs import common

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "speechverse_jax")
SECTIONS = ("train", "optim", "mesh", "model", "data")
# ConfigDict methods: a chain that reaches one of these stops being a key path.
METHODS = {"to_dict", "items", "keys", "values", "lock", "unlock", "unlocked", "copy_and_resolve_references",
           "to_json_best_effort", "to_json", "update"}
# Variables that hold one section, per module (relative to the package).
SECTION_ALIASES = {
    "data/config.py": {"cfg": "data"}, "data/sources.py": {"cfg": "data"}, "data/loader.py": {"cfg": "data"},
    "train/loop.py": {"tcfg": "train"}, "train/optimizer.py": {"optim": "optim"},
    "models/config.py": {"model": "model"},
}


def full_config():
    return common.stage_config("stage2_multitask")


def _chain(node):
    """`a.b.c` (Load) -> ['a', 'b', 'c'], else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + names[::-1]
    return None


def config_reads(path, aliases):
    """[(line, ['section', 'key', ...], is_get)] read from config-like chains in one module."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = []
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
            continue  # only the outermost attribute of each chain
        if not isinstance(node.ctx, ast.Load):
            continue
        chain = _chain(node)
        if not chain:
            continue
        # `cfg.x`, `self.cfg.x`, `self.pipeline.cfg.x`; `config.data.x`, `stage.train.x`
        alias = next((j for j, name in enumerate(chain[:-1]) if name in aliases), None)
        section = next((j for j, name in enumerate(chain[:-1]) if name in ("config", "stage")
                        and chain[j + 1] in SECTIONS), None)
        if alias is not None:
            keys = [aliases[chain[alias]]] + chain[alias + 1:]
        elif section is not None:
            keys = chain[section + 1:]
        else:
            continue
        is_get = isinstance(parents.get(node), ast.Call) and keys[-1] == "get"
        out.append((node.lineno, keys, is_get))
    return out


def missing_keys(config, reads):
    problems = []
    for line, keys, is_get in reads:
        node = config
        for i, key in enumerate(keys):
            if key == "get" and is_get:
                problems.append((line, ".".join(keys[:i]) + ".get(...) with a default"))
                break
            if key in METHODS or not isinstance(node, ml_collections.ConfigDict):
                break
            if key not in node:
                problems.append((line, ".".join(keys[: i + 1])))
                break
            node = node[key]
    return problems


def all_reads():
    for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, PACKAGE)
        if rel.startswith("configs" + os.sep):
            continue  # config modules write fields, they do not read them
        reads = config_reads(path, SECTION_ALIASES.get(rel.replace(os.sep, "/"), {}))
        if reads:
            yield rel, reads


def test_every_key_the_code_reads_exists_in_the_stage_config():
    config = full_config()
    problems = [f"{rel}:{line}: {what}" for rel, reads in all_reads() for line, what in missing_keys(config, reads)]
    assert not problems, "config keys read by the code but missing from the config:\n" + "\n".join(problems)


def test_the_scan_sees_the_reads_and_catches_a_missing_key():
    reads = dict(all_reads())
    seen = {tuple(k) for r in reads.values() for _, k, _ in r}
    # a few reads that must be seen, from each section's reader
    for keys in (("train", "max_steps"), ("optim", "decay"), ("model", "lora", "rank"), ("data", "read_threads"),
                 ("mesh", "rules"), ("train", "log_mfu")):
        assert keys in seen, keys
    config = full_config()
    with config.unlocked():
        del config.train["log_mfu"]
    assert [w for _, w in missing_keys(config, reads["train/loop.py"])] == ["train.log_mfu"]
    assert missing_keys(full_config(), [(1, ["optim", "get"], True)]) == [(1, "optim.get(...) with a default")]


@pytest.mark.parametrize("name,arg", [("stage1", None), ("stage2_warmup", "weighted"), ("stage2_multitask", "wlm,v5e-16"),
                                      ("demo", "quick")])
def test_packaged_stage_configs_have_every_key(name, arg):
    from speechverse_jax import configs

    config = configs.load(name, arg)
    stages = [config[s] for s in config.order] if "order" in config else [config]
    for stage in stages:
        problems = [f"{rel}:{line}: {what}" for rel, reads in all_reads() for line, what in missing_keys(stage, reads)]
        assert not problems, problems
