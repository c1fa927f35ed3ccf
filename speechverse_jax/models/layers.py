"""Shared building blocks: a Dense with logical axes and optional LoRA, norms.

Every weight is created through `nn.with_logical_partitioning`, so sharding is a matter of
the rules table in the config (see docs/architecture.md for the axis vocabulary).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
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


# `model.remat`: what a rematerialised layer keeps for the backward pass.
REMAT_POLICIES = {
    "none": None,  # no remat: every intermediate of every layer is kept
    "full": "nothing_saveable",  # keep only the layer inputs, recompute the rest
    "dots_saveable": "dots_saveable",  # keep matmul outputs, recompute the element-wise work
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
}


def remat_policy(name: str):
    """The `jax.checkpoint_policies` policy of `model.remat` (None for 'none')."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {name!r}")
    return None if REMAT_POLICIES[name] is None else getattr(jax.checkpoint_policies, REMAT_POLICIES[name])


def layer_class(cls, remat: str, static_argnums=(), scanned: bool = False):
    """`cls` wrapped in `nn.remat` with the policy of `remat` ('none': unchanged). Inside `nn.scan`
    CSE cannot undo the remat, so `prevent_cse` is only needed for unrolled layers."""
    policy = remat_policy(remat)
    if policy is None:
        return cls
    return nn.remat(cls, policy=policy, prevent_cse=not scanned, static_argnums=static_argnums)


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


# (mesh, logical-axis rules) of the activation constraints while a model function is traced.
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Make `constrain` take effect: activations named with logical axes are laid out on `mesh`
    by `rules` (the same table as the params, `config.mesh.rules`) while this context is open.

    Enter it around the *tracing* of a model function (see `with_activation_sharding`); a jitted
    function traced outside it has no activation constraints. `mesh=None` turns them off.
    """
    token = _ACTIVATION_SHARDING.set(None if mesh is None else (mesh, tuple(tuple(r) for r in rules)))
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def with_activation_sharding(fn, mesh, rules):
    """`fn` run inside `activation_sharding(mesh, rules)`: wrap a step before `jax.jit` so every
    trace of it sees the constraints."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def activation_spec(shape: Sequence[int], names: Sequence[Optional[str]], mesh, rules) -> jax.sharding.PartitionSpec:
    """The mesh layout of an activation of `shape` with logical axis `names`: rules tried in
    order, a mesh axis used at most once; a dimension the assigned mesh axes do not divide stays
    unsharded (e.g. 12 heads on tensor=8, or a batch of 1 while decoding)."""
    if len(names) != len(shape):
        raise ValueError(f"constrain: {len(names)} axis names {tuple(names)} for an array of shape {tuple(shape)}")
    axes = nn.logical_to_mesh_axes(tuple(names), rules)
    dims = []
    for size, a in zip(shape, tuple(axes) + (None,) * (len(shape) - len(axes))):
        group = () if a is None else (a if isinstance(a, tuple) else (a,))
        ways = 1
        for m in group:
            ways *= mesh.shape[m]
        dims.append(a if group and size % ways == 0 else None)
    return jax.sharding.PartitionSpec(*dims)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Logical sharding constraint on an activation (`names`: one logical axis name or None per
    dimension). Takes effect inside `activation_sharding(mesh, rules)`; a no-op outside it."""
    ctx = _ACTIVATION_SHARDING.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if mesh.size == 1:
        return x
    spec = activation_spec(x.shape, names, mesh, rules)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
