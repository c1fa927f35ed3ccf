"""Which params train (ordered regex rules), the split into trainable / frozen trees, and AdamW.

Rules are big_vision style: an ordered list of `(regex, "train" | "freeze")` matched against the
'/'-joined param path; the first match wins and every leaf must match one rule. The optimizer
only ever sees the trainable tree, so no frozen weight has a gradient or an Adam moment.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

log = logging.getLogger(__name__)

TRAIN, FREEZE = "train", "freeze"


def label_params(params: Any, rules: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    """'/'-joined path -> 'train' | 'freeze'. Raises naming every unmatched path."""
    compiled = []
    for pattern, label in rules:
        if label not in (TRAIN, FREEZE):
            raise ValueError(f"train.param_rules: label of {pattern!r} must be 'train' or 'freeze', got {label!r}")
        compiled.append((re.compile(pattern), label))
    labels, unmatched = {}, []
    for path in traverse_util.flatten_dict(params, sep="/"):
        for regex, label in compiled:
            if regex.search(path):
                labels[path] = label
                break
        else:
            unmatched.append(path)
    if unmatched:
        raise ValueError(
            f"train.param_rules match none of these {len(unmatched)} params (add a rule):\n  "
            + "\n  ".join(unmatched[:50])
        )
    return labels


def split(params: Any, labels: Dict[str, str]) -> Tuple[dict, dict]:
    """(trainable tree, frozen tree), both nested dicts holding only their own leaves."""
    flat = traverse_util.flatten_dict(params, sep="/")
    train = {k: v for k, v in flat.items() if labels[k] == TRAIN}
    frozen = {k: v for k, v in flat.items() if labels[k] == FREEZE}
    return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge(*trees: dict) -> dict:
    """Inverse of `split`: one nested dict holding the leaves of all trees."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def count(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def describe(labels: Dict[str, str], params: Any) -> str:
    flat = traverse_util.flatten_dict(params, sep="/")
    n_train = sum(int(np.prod(np.shape(flat[k]))) for k, v in labels.items() if v == TRAIN)
    n_all = sum(int(np.prod(np.shape(x))) for x in flat.values())
    return f"params: {n_train:,} trainable, {n_all - n_train:,} frozen, {n_all:,} total"


def learning_rate_schedule(optim) -> optax.Schedule:
    """Linear warm-up to `optim.lr`, then `optim.decay` ('cosine' | 'linear' | 'constant' | 'rsqrt')."""
    warmup, total, peak = int(optim.warmup_steps), int(optim.total_steps), float(optim.lr)
    if peak <= 0:
        raise ValueError(f"optim.lr must be positive, got {peak}")
    if warmup < 0 or total <= 0:
        raise ValueError(f"optim.warmup_steps must be >= 0 and optim.total_steps > 0, got {warmup}, {total}")
    end = peak * float(optim.get("final_lr_fraction", 0.0))
    decay_steps = max(total - warmup, 1)
    kind = optim.get("decay", "cosine")
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
    elif kind == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    elif kind == "rsqrt":
        after = lambda step: peak * jax.lax.rsqrt(1.0 + step / max(warmup, 1))  # noqa: E731
    else:
        raise ValueError(f"optim.decay must be cosine, linear, constant or rsqrt, got {kind!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(optim) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW (weight decay on matrices only) with the schedule."""
    schedule = learning_rate_schedule(optim)
    decay_mask = lambda tree: jax.tree_util.tree_map(lambda x: jnp.ndim(x) >= 2, tree)  # noqa: E731
    parts: List[optax.GradientTransformation] = []
    if optim.get("clip_norm", 0.0) and optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(
        optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                    weight_decay=float(optim.weight_decay), mask=decay_mask)
    )
    return optax.chain(*parts), schedule
