"""Shared building blocks: a Dense with logical axes and optional LoRA, norms.

Every weight is created through `nn.with_logical_partitioning`, so sharding is a matter of
the rules table in the config (see docs/architecture.md for the axis vocabulary).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechverse_jax import rules

Dtype = Any

# LoRA on the query and value projections of every T5 attention (the paper's layout); a module
# path regex, matched with re.fullmatch like every rule (speechverse_jax/rules.py).
DEFAULT_LORA_TARGETS = r".*/(self_attention|cross_attention)/(q|v)"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the projections whose module path matches `target_regex`.

    The adapted projection computes `x @ W + (alpha / rank) * dropout(x) @ A @ B` with
    `A [in, rank]` (random init) and `B [rank, out]` (zero init), so a fresh adapter leaves the
    model's outputs unchanged.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_regex: str = DEFAULT_LORA_TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        rules.compile_rule(self.target_regex, "model.lora.target_regex")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, module_path: str) -> bool:
        return rules.matches(self.target_regex, module_path)


def module_path(module: nn.Module) -> str:
    """The '/'-joined path of a bound module inside the params tree, e.g. 't5/encoder/block_0/...'."""
    return "/".join(str(p) for p in module.scope.path)


class Dense(nn.Module):
    """`y = x @ kernel (+ bias)` over the last axis; kernel `[in, out]`.

    Attributes:
      features: output width.
      axes: logical names of the kernel's (in, out) axes.
      lora: when set and the module path matches `lora.target_regex`, adds `lora_a`/`lora_b`.
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (in_features, self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        if self.lora is not None and self.lora.matches(module_path(self)):
            lora_a = self.param(
                "lora_a",
                nn.with_logical_partitioning(
                    nn.initializers.kaiming_uniform(), (self.axes[0], "lora_rank")
                ),
                (in_features, self.lora.rank),
                jnp.float32,
            )
            lora_b = self.param(
                "lora_b",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("lora_rank", self.axes[1])),
                (self.lora.rank, self.features),
                jnp.float32,
            )
            h = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
            h = jnp.dot(jnp.dot(h, lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
            y = y + (self.lora.scale * h).astype(y.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with `scale`/`bias` named like the rest of the tree."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (features,), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                (features,), self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Conv1D(nn.Module):
    """`[batch, time, in] -> [batch, time', features]`; kernel `[k, in / groups, features]`."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_kernel", "conv_in", "conv_out")),
            (self.kernel_size, x.shape[-1] // self.groups, self.features),
            self.param_dtype,
        )
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
        )
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                (self.features,), self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Logical sharding constraint on an activation; a no-op outside a mesh/rules context."""
    return nn.with_logical_constraint(x, tuple(names))
