"""Run by tests/test_decoder_lm.py in a subprocess with 8 forced CPU devices: a LoRA'd Gemma 3 born
sharded on a (data 2, fsdp 2, tensor 2) mesh by the logical-axis rules, its logits vs the same
model unsharded. Prints one JSON line."""

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from speechverse_jax import hf_tiny  # noqa: E402
from speechverse_jax.models.decoder_lm import DecoderLM, DecoderLMConfig  # noqa: E402
from speechverse_jax.models.layers import LoRAConfig  # noqa: E402
from speechverse_jax.train.partitioning import DEFAULT_RULES, make_mesh  # noqa: E402


def main():
    cfg = DecoderLMConfig.from_hf(dict(hf_tiny.TINY_DECODER_LMS["gemma3"], model_type="gemma3_text"))
    model = DecoderLM(cfg, lora=LoRAConfig(rank=2))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (4, 12)), jnp.int32)
    mask = jnp.ones((4, 12), bool).at[1, :5].set(False)
    with mesh, nn.logical_axis_rules(DEFAULT_RULES):
        abstract = jax.eval_shape(lambda r: model.init(r, input_ids=ids), jax.random.PRNGKey(0))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, DEFAULT_RULES)
        params = jax.jit(lambda r: model.init(r, input_ids=ids), out_shardings=shardings)(jax.random.PRNGKey(0))
        params = nn.unbox(params)["params"]
        logits = jax.jit(lambda p, i, m: model.apply({"params": p}, input_ids=i, attention_mask=m).logits)(params, ids, mask)
        specs = {k: list(v.sharding.spec) for k, v in (("q", params["layers_0"]["self_attention"]["q"]["kernel"]),
                                                       ("down", params["layers_0"]["mlp"]["down"]["kernel"]))}
    host = jax.device_get(params)
    ref = model.apply({"params": host}, input_ids=ids, attention_mask=mask).logits
    print(json.dumps({"specs": specs, "logits_max_abs": float(jnp.max(jnp.abs(logits - ref)))}))


if __name__ == "__main__":
    main()
