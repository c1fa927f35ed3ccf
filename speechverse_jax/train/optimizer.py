"""Which params train (ordered regex rules), the split into trainable / frozen trees, and AdamW.

Rules are big_vision style: an ordered list of `(regex, "train" | "freeze")` matched against the
'/'-joined param path; the first match wins and every leaf must match one rule. The optimizer
only ever sees the trainable tree, so no frozen weight has a gradient or an Adam moment.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from speechverse_jax import rules, tree

log = logging.getLogger(__name__)

TRAIN, FREEZE = "train", "freeze"


def label_params(params: Any, param_rules: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    """'/'-joined path -> 'train' | 'freeze': the first rule whose regex fullmatches the path
    (speechverse_jax/rules.py). Raises naming every unmatched path, and every rule that matches
    no param."""
    for pattern, label in param_rules:
        if label not in (TRAIN, FREEZE):
            raise ValueError(f"train.param_rules: label of {pattern!r} must be 'train' or 'freeze', got {label!r}")
        rules.compile_rule(pattern, "train.param_rules")
    paths = list(tree.flatten(params))
    labels, unmatched = {}, []
    for path in paths:
        hit = rules.first_match(param_rules, path)
        if hit is None:
            unmatched.append(path)
        else:
            labels[path] = hit[1]
    if unmatched:
        raise ValueError(
            f"train.param_rules match none of these {len(unmatched)} params (add a rule; rules match whole "
            f"paths with re.fullmatch):\n  " + "\n  ".join(unmatched[:50])
        )
    rules.check_used([p for p, _ in param_rules], paths, "train.param_rules")
    return labels


def split(params: Any, labels: Dict[str, str]) -> Tuple[dict, dict]:
    """(trainable tree, frozen tree), both nested dicts holding only their own leaves."""
    flat = tree.flatten(params)
    train = {k: v for k, v in flat.items() if labels[k] == TRAIN}
    frozen = {k: v for k, v in flat.items() if labels[k] == FREEZE}
    return tree.unflatten(train), tree.unflatten(frozen)


def describe(labels: Dict[str, str], params: Any) -> str:
    flat = tree.flatten(params)
    n_train = sum(int(np.prod(np.shape(flat[k]))) for k, v in labels.items() if v == TRAIN)
    n_all = sum(int(np.prod(np.shape(x))) for x in flat.values())
    return f"params: {n_train:,} trainable, {n_all - n_train:,} frozen, {n_all:,} total"


def learning_rate_schedule(optim, max_steps: int = 0) -> optax.Schedule:
    """Linear warm-up to `optim.lr`, then `optim.decay` ('cosine' | 'linear' | 'constant' | 'rsqrt')
    over `optim.total_steps` steps, or `max_steps` (the run's `train.max_steps`) when that is 0."""
    warmup, peak = int(optim.warmup_steps), float(optim.lr)
    total = int(optim.total_steps) or int(max_steps)
    if peak <= 0:
        raise ValueError(f"optim.lr must be positive, got {peak}")
    if warmup < 0 or total <= 0:
        raise ValueError(f"optim.warmup_steps must be >= 0 and the schedule's length (optim.total_steps, or "
                         f"train.max_steps when it is 0) > 0, got {warmup}, {total}")
    end = peak * float(optim.final_lr_fraction)
    decay_steps = max(total - warmup, 1)
    kind = optim.decay
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


def make_optimizer(optim, max_steps: int = 0) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW (weight decay on matrices only) with the schedule
    (`learning_rate_schedule(optim, max_steps)`)."""
    schedule = learning_rate_schedule(optim, max_steps)
    decay_mask = lambda tree: jax.tree_util.tree_map(lambda x: jnp.ndim(x) >= 2, tree)  # noqa: E731
    parts: List[optax.GradientTransformation] = []
    if optim.clip_norm and optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(
        optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                    weight_decay=float(optim.weight_decay), mask=decay_mask)
    )
    return optax.chain(*parts), schedule
