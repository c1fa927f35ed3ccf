"""Run by test_sharding.py in a fresh process with 8 forced CPU devices.

Trains 3 steps of the tiny model on two meshes (pure data parallel; data x fsdp x tensor) and prints a JSON line per mesh with the
loss history and the final trainable params' checksums relative to the 1-device run.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from speechverse_jax.train.loop import train  # noqa: E402
from speechverse_jax.train.partitioning import make_mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_train import tiny_config, tiny_data  # noqa: E402


def run(base, workdir, shape):
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    config = tiny_config(base, steps=3)
    data = tiny_data()
    data.shape["batch_size"] = 8
    out = train(config, workdir, data, mesh=mesh, progress=False)
    losses = [json.loads(l)["loss"] for l in open(os.path.join(workdir, "metrics.jsonl")) if '"train"' in l]
    params = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(out["state"].params, sep="/").items()}
    flat = traverse_util.flatten_dict(out["state"].params, sep="/")
    shardings = {k: v.sharding.shard_shape(v.shape) != v.shape for k, v in flat.items()}
    return losses, params, shardings


def main():
    base, root = sys.argv[1], sys.argv[2]
    assert len(jax.devices()) == 8, jax.devices()
    ref_losses, ref_params, _ = run(base, os.path.join(root, "m111"), (1, 1, 1))
    for shape in [(8, 1, 1), (2, 2, 2)]:  # (1, 4, 2) took the (2, 2, 2) code paths again
        losses, params, shardings = run(base, os.path.join(root, "m" + "".join(map(str, shape))), shape)
        loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        # per leaf: max |diff| / max |ref| (element-wise worst case) and ||diff|| / ||ref|| (relative L2)
        max_rel = {k: float(np.max(np.abs(params[k] - ref_params[k])) / max(np.max(np.abs(ref_params[k])), 1e-12))
                   for k in ref_params}
        l2_rel = {k: float(np.linalg.norm(params[k] - ref_params[k]) / max(np.linalg.norm(ref_params[k]), 1e-12))
                  for k in ref_params}
        worst = max(max_rel, key=max_rel.get)
        sharded = sum(shardings.values())
        print(json.dumps({"mesh": shape, "loss_rel": loss_rel, "param_max_rel": max_rel[worst], "worst_leaf": worst,
                          "param_l2_rel": max(l2_rel.values()), "losses": losses,
                          "sharded_trainable_leaves": sharded}), flush=True)


if __name__ == "__main__":
    main()
