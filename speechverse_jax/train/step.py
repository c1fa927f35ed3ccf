"""The jitted train and eval steps.

Gradients are taken with respect to the trainable tree only (`jax.value_and_grad` over its first
argument); the frozen tree is a plain input, so no weight gradient of WavLM or T5 exists. A step
whose loss or gradients are not finite leaves params and optimizer moments untouched and is counted.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from speechverse_jax.models.composed import layout_of
from speechverse_jax.models.speechverse import SpeechVerse
from speechverse_jax.models.speechverse_decoder import SpeechVerseDecoder
from speechverse_jax.models.t5 import shift_right
from speechverse_jax.tree import merge

Batch = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # trainable params only (float32)
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw key data, so it checkpoints as a plain array
    skipped_steps: jax.Array  # int32 [] non-finite steps skipped so far
    consecutive_skips: jax.Array  # int32 [] non-finite steps in a row


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(jax.random.PRNGKey(seed)),
        skipped_steps=jnp.zeros((), jnp.int32),
        consecutive_skips=jnp.zeros((), jnp.int32),
    )


def _token_nll(model, params: Any, batch: Batch, deterministic: bool, rng=None):
    """Teacher-forced (per-token NLL `[b, t]` float32, loss mask `[b, t]`) from raw audio or from
    cached encoder states (`hidden_states`), for either layout.

    T5: the decoder reads `target_ids` shifted right; targets are `target_ids` under `target_mask`.
    Decoder-only: `[prefix_ids | audio | instruction_ids | target_ids]` packed with right padding;
    the loss is on the positions that predict a target (answer) token, EOS included, with the LM
    head run `model.loss_chunk` positions at a time when set.
    """
    rngs = None if deterministic else {"dropout": rng}
    cached = "hidden_states" in batch  # [b, L+1, frames, dim], cached frozen-encoder outputs
    audio = ((tuple(jnp.moveaxis(batch["hidden_states"], 1, 0)), batch["frame_mask"]) if cached
             else (batch["audio"], batch["audio_mask"]))
    if layout_of(model.cfg) == "decoder":
        return model.apply({"params": params}, *audio, batch["prefix_ids"], batch["prefix_mask"],
                           batch["instruction_ids"], batch["instruction_mask"], batch["target_ids"],
                           batch["target_mask"], False, deterministic, rngs=rngs,
                           method=(SpeechVerseDecoder.answer_nll_from_hidden_states if cached
                                   else SpeechVerseDecoder.answer_nll))
    t5 = model.cfg.t5
    dec_in = shift_right(batch["target_ids"], t5.decoder_start_token_id, t5.pad_token_id)
    nll = model.apply({"params": params}, *audio, batch["instruction_ids"], batch["instruction_mask"], dec_in,
                      batch["target_ids"], batch["target_mask"], deterministic, rngs=rngs,
                      method=SpeechVerse.target_nll_from_hidden_states if cached else SpeechVerse.target_nll)
    mask = batch["target_mask"].astype(bool)
    return jnp.where(mask, nll, 0.0), mask


def _token_mask(batch: Batch, mask: jax.Array) -> jax.Array:
    if "example_mask" in batch:
        mask = mask & batch["example_mask"].astype(bool)[:, None]
    return mask


def _loss_sums(model, params, batch, deterministic, rng, num_tasks):
    """(summed NLL, token count, per-task NLL sums [num_tasks], per-task token counts)."""
    nll, mask = _token_nll(model, params, batch, deterministic, rng)
    mask = _token_mask(batch, mask)
    per_example = jnp.where(mask, nll, 0.0).sum(-1)
    tokens = mask.sum(-1)
    task = batch.get("task_id", jnp.zeros(per_example.shape, jnp.int32))
    task_nll = jax.ops.segment_sum(per_example, task, num_segments=num_tasks)
    task_tokens = jax.ops.segment_sum(tokens, task, num_segments=num_tasks)
    return per_example.sum(), tokens.sum(), task_nll, task_tokens


def make_train_step(
    model: SpeechVerse,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_tasks: int = 1,
    accum_steps: int = 1,
) -> Callable[[TrainState, Any, Batch], Tuple[TrainState, Dict[str, jax.Array]]]:
    """`train_step(state, frozen_params, batch) -> (state, metrics)`; jit it with shardings.

    With `accum_steps > 1` the batch is split into that many strided micro-batches along its first
    axis and their gradients are summed before one update (token-weighted, as one big batch would be).
    """

    def micro_grads(trainable, frozen, micro, rng):
        def loss_fn(p):
            nll, tokens, task_nll, task_tokens = _loss_sums(model, merge(p, frozen), micro, False, rng, num_tasks)
            return nll, (tokens, task_nll, task_tokens)

        (nll, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return nll, aux, grads

    def train_step(state: TrainState, frozen: Any, batch: Batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum_steps == 1:
            nll, (tokens, task_nll, task_tokens), grads = micro_grads(state.params, frozen, batch, rng)
        else:
            # Micro-batch i takes rows i, i + accum, i + 2 accum, ...: each device's contiguous block
            # of the sharded batch contributes equally to every micro-batch, so no rows move.
            micro = jax.tree_util.tree_map(
                lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]), 0, 1),
                batch)

            def body(carry, xs):
                i, mb = xs
                out = micro_grads(state.params, frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, out), None

            zeros = jax.tree_util.tree_map(
                jnp.zeros_like, jax.eval_shape(lambda: micro_grads(state.params, frozen,
                                                                   jax.tree_util.tree_map(lambda x: x[0], micro), rng)))
            (nll, (tokens, task_nll, task_tokens), grads), _ = jax.lax.scan(
                body, zeros, (jnp.arange(accum_steps), micro))
        denom = jnp.maximum(tokens, 1).astype(jnp.float32)
        loss = nll / denom
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        state = state.replace(
            step=state.step + 1,
            params=jax.tree_util.tree_map(keep, new_params, state.params),
            opt_state=jax.tree_util.tree_map(keep, new_opt, state.opt_state),
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
            consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step - 1),
            "finite": finite,
            "target_tokens": tokens,
            "task_nll": task_nll,
            "task_tokens": task_tokens,
            "skipped_steps": state.skipped_steps,
            "consecutive_skips": state.consecutive_skips,
        }
        return state, metrics

    return train_step


def make_eval_step(model: SpeechVerse, num_tasks: int = 1):
    """`eval_step(trainable, frozen, batch) -> summed NLL, tokens, per-task sums` (no dropout)."""

    def eval_step(trainable, frozen, batch):
        nll, tokens, task_nll, task_tokens = _loss_sums(model, merge(trainable, frozen), batch, True, None, num_tasks)
        return {"nll": nll, "tokens": tokens, "task_nll": task_nll, "task_tokens": task_tokens}

    return eval_step
