"""Slice presets (speechverse_jax/train/slices.py) and the LAYOUT,SLICE config arg."""

import os

import pytest

from speechverse_jax import configs
from speechverse_jax.configs import common as config_common
from speechverse_jax.train import partitioning, slices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(slices.PRESETS))
def test_preset_mesh_fills_the_devices_and_reaches_the_paper_batch(name):
    p = slices.PRESETS[name]
    assert p.name == name
    assert p.data * p.fsdp * p.tensor == p.devices
    assert partitioning.mesh_shape(p.data, p.fsdp, p.tensor, p.devices) == (p.data, p.fsdp, p.tensor)
    assert p.per_device_batch * p.data * p.fsdp * p.accum_steps == slices.PAPER_GLOBAL_BATCH == p.global_batch
    assert p.devices % p.hosts == 0 and slices.PAPER_GLOBAL_BATCH % p.hosts == 0  # rows per process
    assert p.why
    if p.hbm_gb:  # the memory model's estimate leaves the preset's share of spare memory
        assert p.estimated_gb() <= slices.USABLE_FRACTION * p.hbm_gb, (name, p.estimated_gb())


def test_tpu_presets_name_their_accelerator_and_runtime():
    expected = {"v4-8": ("v4-8", "tpu-ubuntu2204-base"), "v5e-16": ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                "v5p-32": ("v5p-32", "v2-alpha-tpuv5"), "v6e-8": ("v6e-8", "v2-alpha-tpuv6e")}
    for name, (accel, runtime) in expected.items():
        assert (slices.PRESETS[name].accelerator, slices.PRESETS[name].runtime_version) == (accel, runtime)
    assert {"gpu-8xh100", "cpu-8"} <= set(slices.PRESETS)


@pytest.mark.parametrize("name", sorted(slices.PRESETS))
def test_apply_slice_sets_mesh_batch_and_accumulation(name):
    p = slices.PRESETS[name]
    config = config_common.stage_config("stage1")
    assert slices.apply_slice(config, name) is config
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (p.data, p.fsdp, p.tensor)
    assert config.data.batch_size == 768 and config.train.accum_steps == p.accum_steps
    micro = config.data.batch_size // config.train.accum_steps
    assert micro * config.train.accum_steps == config.data.batch_size
    assert micro % (p.data * p.fsdp) == 0 and micro // (p.data * p.fsdp) == p.per_device_batch


def test_apply_slice_other_global_batch_and_errors():
    config = config_common.stage_config("stage1")
    slices.apply_slice(config, "v5e-16", global_batch=1152)  # 16 shards x 24 rows x 3 micro-steps
    assert config.data.batch_size == 1152 and config.train.accum_steps == 3
    with pytest.raises(ValueError, match="multiple of"):
        slices.apply_slice(config, "v5e-16", global_batch=100)
    with pytest.raises(ValueError, match=r"unknown slice preset 'v9-8'.*v5e-16"):
        slices.apply_slice(config, "v9-8")


@pytest.mark.parametrize("arg, layout, combination, mesh, accum", [
    (None, "wlm", "last", (-1, 1, 1), 1),
    ("", "wlm", "last", (-1, 1, 1), 1),
    ("weighted", "weighted", "weighted", (-1, 1, 1), 1),
    ("wlm,v5e-16", "wlm", "last", (1, 16, 1), 2),
    ("v5e-16", "wlm", "last", (1, 16, 1), 2),
    (" v5p-32 , weighted ", "weighted", "weighted", (16, 1, 1), 1),
])
def test_paper_stage_config_arg(arg, layout, combination, mesh, accum):
    config = config_common.paper_stage_config("stage2_warmup", arg)
    assert config.model.layer_combination == combination
    assert config.model.dtype == "bfloat16" and config.model.frozen_param_dtype == "bfloat16"
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == mesh
    assert config.train.accum_steps == accum and config.data.batch_size == 768
    assert config_common.parse_paper_arg(arg)[0] == layout


@pytest.mark.parametrize("arg, what", [("bogus", "unknown"), ("wlm,weighted", "a second layout"),
                                       ("v5e-16,v4-8", "a second slice"), ("wlm,v5e16", "unknown")])
def test_paper_stage_config_bad_arg_names_the_choices(arg, what):
    with pytest.raises(ValueError) as err:
        config_common.paper_stage_config("stage1", arg)
    message = str(err.value)
    assert what in message and "'wlm'" in message and "'weighted'" in message and "'v5e-16'" in message
    assert "gpu-8xh100" in message


def test_config_files_take_a_slice():
    stage1 = configs.load(os.path.join(REPO, "configs", "stage1.py"), "v5e-16")
    assert stage1.mesh.fsdp == 16 and stage1.train.accum_steps == 2
    curriculum = configs.load(os.path.join(REPO, "configs", "curriculum.py"), "weighted,v6e-8")
    for stage in config_common.STAGES:
        s = curriculum[stage]
        assert (s.mesh.data, s.mesh.fsdp, s.train.accum_steps, s.data.batch_size) == (1, 8, 3, 768)
        assert s.model.layer_combination == "weighted"


def test_table_lists_every_preset():
    text = slices.table()
    for name, p in slices.PRESETS.items():
        assert f"| {name} |" in text and f"({p.data}, {p.fsdp}, {p.tensor})" in text


def test_docs_show_the_current_table():
    assert slices.table() in open(os.path.join(REPO, "docs", "scale.md")).read(), \
        "docs/scale.md is out of date: paste speechverse_jax.train.slices.table() into it"
