"""The outer (meta-parameter) optimizer built from `config.outer`."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(outer: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    if outer.schedule == "constant":
        return optax.constant_schedule(outer.learning_rate)
    if outer.schedule == "cosine":
        return optax.cosine_decay_schedule(outer.learning_rate, decay_steps=max(num_steps, 1))
    if outer.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, outer.learning_rate, warmup_steps=outer.warmup_steps, decay_steps=max(num_steps, 1)
        )
    raise ValueError(f"config field 'outer.schedule' = {outer.schedule!r} is unknown")


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for `outer.optimizer` (with optional clipping) and its learning-rate schedule."""
    outer = config.outer
    schedule = learning_rate_schedule(outer, config.train.num_steps)
    if outer.optimizer == "adam":
        tx = optax.adam(schedule, eps=outer.adam_eps)
    elif outer.optimizer == "adamw":
        tx = optax.adamw(schedule, eps=outer.adam_eps, weight_decay=outer.weight_decay)
    elif outer.optimizer == "sgd":
        tx = optax.sgd(schedule)
    else:
        raise ValueError(f"config field 'outer.optimizer' = {outer.optimizer!r} is unknown")
    if outer.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(outer.grad_clip_norm), tx)
    return tx, schedule
