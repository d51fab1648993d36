"""The sinusoid regression family's tasks (Finn et al. 2017): y = amplitude * sin(frequency * x + phase).

A task is a dict of arrays: support_x [K, 1], support_y [K, 1], query_x [Q, 1], query_y [Q, 1], and the
curve's amplitude, frequency and phase (kept for the evaluation's figures). `families.Sinusoid` samples
batches of them from task keys.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections


def sample_task(key: jax.Array, cfg: ml_collections.ConfigDict, dtype: Any) -> dict[str, jax.Array]:
    """One task y = amplitude * sin(frequency * x + phase), support and query x uniform in [x_min, x_max]."""
    k_amp, k_freq, k_phase, k_support, k_query = jax.random.split(key, 5)
    uniform = functools.partial(jax.random.uniform, dtype=dtype)
    amplitude = uniform(k_amp, minval=cfg.amplitude_min, maxval=cfg.amplitude_max)
    frequency = uniform(k_freq, minval=cfg.frequency_min, maxval=cfg.frequency_max)
    phase = uniform(k_phase, minval=cfg.phase_min, maxval=cfg.phase_max)
    support_x = uniform(k_support, (cfg.num_support, 1), minval=cfg.x_min, maxval=cfg.x_max)
    query_x = uniform(k_query, (cfg.num_query, 1), minval=cfg.x_min, maxval=cfg.x_max)
    curve = lambda x: amplitude * jnp.sin(frequency * x + phase)
    return dict(
        support_x=support_x,
        support_y=curve(support_x),
        query_x=query_x,
        query_y=curve(query_x),
        amplitude=amplitude,
        frequency=frequency,
        phase=phase,
    )
