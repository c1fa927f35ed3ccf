"""The trainable audio adaptor: layer combination (paper Eq. 1) and the conv downsampler."""

from __future__ import annotations

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechverse_jax.models.layers import Conv1D, Dtype, LayerNorm, constrain

LAYER_COMBINATIONS = ("last", "weighted", "softmax")


class LayerCombination(nn.Module):
    """Combines the encoder's hidden states into one sequence.

    - `last`: `h(L)`, the last layer only (the paper's WavLM setting); no params.
    - `weighted`: `1/L * sum_l w_l h(l)` over the L transformer layers, `w_l` initialised to 1
      (paper Eq. 1, its Best-RQ setting).
    - `softmax`: `sum_l softmax(w)_l h(l)`, `w` initialised to 0 (a uniform average at start).

    `hidden_states[0]` (the input to the first transformer layer) is not part of the sum, as in
    Eq. 1 where `l` runs from 1 to L.
    """

    mode: str = "last"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: Sequence[jax.Array]) -> jax.Array:
        """hidden_states: L+1 arrays `[batch, frames, dim]` -> `[batch, frames, dim]`."""
        if self.mode not in LAYER_COMBINATIONS:
            raise ValueError(f"model.layer_combination must be one of {LAYER_COMBINATIONS}, got {self.mode!r}")
        layers = hidden_states[1:]
        if self.mode == "last":
            return layers[-1].astype(self.dtype)
        num = len(layers)
        init = nn.initializers.ones_init() if self.mode == "weighted" else nn.initializers.zeros_init()
        w = self.param("weights", nn.with_logical_partitioning(init, ("layers",)), (num,), jnp.float32)
        w = w / num if self.mode == "weighted" else jax.nn.softmax(w)
        stacked = jnp.stack([h.astype(jnp.float32) for h in layers])  # [L, b, t, d]
        return jnp.einsum("l,lbtd->btd", w, stacked).astype(self.dtype)


def downsampled_lengths(lengths: jax.Array, strides: Sequence[int], kernel_size: int = 3) -> jax.Array:
    """Valid output frames after the conv stack ('same' padding): `ceil(n / s)` per block."""
    del kernel_size  # with padding (k - 1) // 2 and odd k the length only depends on the stride
    for s in strides:
        lengths = (lengths + s - 1) // s
    return lengths


class Downsampler(nn.Module):
    """N blocks of `Conv1D(kernel k, stride s_i, 'same' zero padding) -> LayerNorm`.

    Input frames past each clip's length are zeroed before every conv, so a clip's outputs do not
    depend on how much padding its batch added (the same as running it alone).
    """

    features: int
    strides: Tuple[int, ...] = (2, 2)
    kernel_size: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """x `[batch, frames, dim]`, mask `[batch, frames]` -> (`[batch, frames', features]`, mask')."""
        if self.kernel_size % 2 != 1:
            raise ValueError(f"model.downsampler.kernel_size must be odd, got {self.kernel_size}")
        lengths = mask.sum(axis=-1)
        for i, stride in enumerate(self.strides):
            x = jnp.where(mask[..., None], x, 0).astype(self.dtype)
            x = Conv1D(self.features, self.kernel_size, stride, padding=(self.kernel_size - 1) // 2, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"conv_{i}")(x)
            x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")(x)
            lengths = downsampled_lengths(lengths, (stride,))
            mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
            x = constrain(x, ("batch", "length", "embed"))
        return x, mask

