"""Activation sharding constraints take effect under a mesh (they were a silent no-op before:
flax's `with_logical_constraint` returns its input when no rules are in context)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from speechverse_jax.models.layers import activation_sharding, activation_spec, constrain
from speechverse_jax.train.partitioning import DEFAULT_RULES, make_mesh


class _FakeMesh:
    shape = {"data": 2, "fsdp": 2, "tensor": 2}
    size = 8


def test_activation_layout_per_mesh_axis():
    mesh = _FakeMesh()
    # batch over data x fsdp; embed of activations stays whole (fsdp already used by batch)
    assert activation_spec((8, 10, 48), ("batch", "length", "embed"), mesh, DEFAULT_RULES) == P(("data", "fsdp"), None, None)
    # MLP hidden and logits: the feature axis over tensor
    assert activation_spec((8, 10, 80), ("batch", "length", "mlp"), mesh, DEFAULT_RULES) == P(
        ("data", "fsdp"), None, "tensor")
    assert activation_spec((8, 160), ("batch", "vocab"), mesh, DEFAULT_RULES) == P(("data", "fsdp"), "tensor")
    # a dimension the mesh axes do not divide stays whole (batch 1 while decoding, 3 heads on tensor 2)
    assert activation_spec((1, 3, 7, 8), ("batch", "heads", "length", None), mesh, DEFAULT_RULES) == P(
        None, None, None, None)
    with pytest.raises(ValueError, match="axis names"):
        activation_spec((8, 10), ("batch", "length", "embed"), mesh, DEFAULT_RULES)


def test_constrain_is_a_no_op_outside_the_context():
    x = jnp.ones((4, 6))
    assert constrain(x, ("batch", "embed")) is x
    with activation_sharding(make_mesh(1, 1, 1, devices=jax.devices()[:1]), DEFAULT_RULES):
        assert constrain(x, ("batch", "embed")) is x  # one device: nothing to lay out
    with activation_sharding(None, DEFAULT_RULES):
        assert constrain(x, ("batch", "embed")) is x


def _worker(*args):
    worker = os.path.join(os.path.dirname(__file__), "activation_sharding_worker.py")
    res = subprocess.run([sys.executable, worker, *args], capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {r["constraints"]: r for r in (json.loads(l) for l in res.stdout.splitlines() if l.startswith("{"))}


@pytest.mark.slow
def test_constraints_change_the_compiled_layout_on_a_tensor_parallel_mesh():
    rows = _worker()
    on, off = rows[True], rows[False]
    assert on["lowered_constraints"] > 10 and off["lowered_constraints"] == 0
    # With the constraints, the T5 residual stream is [batch / 4, seq, d_model] per device (embed
    # whole); without them XLA splits d_model over `tensor` following the weights.
    assert on["residual_whole"] > 2 * on["residual_split"], on
    assert off["residual_split"] > off["residual_whole"], off
    assert on["collective_bytes"] != off["collective_bytes"]
