"""Few-shot polynomial regression, a task family defined outside the trainer package.

Task: y = c_0 + c_1 x + ... + c_d x^d (+ noise), a fresh set of coefficients c_j ~ N(0, coefficient_std^2) per
task, inputs x uniform in [x_min, x_max], tasks.num_support support and tasks.num_query query points.

Select it with `--config.tasks.family=examples.polynomial:Polynomial` (configs/polynomial.py does, run from the
repository root). Its fields are tasks.options.<name>, declared in `default_options` below; everything else
(the MLP, the MSE loss, predicting 0 as the baseline, how tasks are keyed by step and index) comes from
`trainer.families.Regression`, so `sample_task` is the whole family.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from trainer import families


class Polynomial(families.Regression):
    """Regression of random polynomials of degree tasks.options.degree."""

    name: ClassVar[str] = "polynomial"
    # This family's config fields (tasks.options.<name>) and their defaults. Validation fills in the ones a
    # config leaves out and checks that each value is of its default's kind (int, float, bool, str).
    default_options: ClassVar[dict[str, Any]] = {
        "degree": 3,  # Highest power of x, d.
        "coefficient_std": 1.0,  # Standard deviation of each coefficient c_j.
        "x_min": -1.0,  # Inputs are uniform in [x_min, x_max].
        "x_max": 1.0,
        "noise_std": 0.0,  # Gaussian noise added to every target, support and query; 0: exact values.
    }

    @staticmethod
    def check_config(config) -> None:
        """The checks beyond the kinds of the values; a ValueError names the field (the CLI prints it)."""
        o = config.tasks.options
        if o.degree < 0:
            raise ValueError(f"config field 'tasks.options.degree' = {o.degree}: expected >= 0")
        if not o.coefficient_std > 0:
            raise ValueError(
                f"config field 'tasks.options.coefficient_std' = {o.coefficient_std}: expected > 0"
            )
        if o.noise_std < 0:
            raise ValueError(f"config field 'tasks.options.noise_std' = {o.noise_std}: expected >= 0")
        if not o.x_min < o.x_max:
            raise ValueError(f"config fields 'tasks.options.x_min' = {o.x_min} must be < 'x_max' = {o.x_max}")

    def sample_task(self, key: jax.Array, dtype) -> dict[str, jax.Array]:
        """One task: support_x [K, 1], support_y [K, 1], query_x [Q, 1], query_y [Q, 1] and its coefficients
        [d + 1] (highest power first, as jnp.polyval takes them)."""
        o, t = self.config.tasks.options, self.config.tasks
        k_coef, k_support, k_query, k_support_noise, k_query_noise = jax.random.split(key, 5)
        coefficients = o.coefficient_std * jax.random.normal(k_coef, (o.degree + 1,), dtype)
        uniform = lambda k, n: jax.random.uniform(k, (n, 1), dtype, minval=o.x_min, maxval=o.x_max)
        support_x, query_x = uniform(k_support, t.num_support), uniform(k_query, t.num_query)
        target = lambda k, x: (
            jnp.polyval(coefficients, x) + o.noise_std * jax.random.normal(k, x.shape, dtype)
        )
        return dict(
            support_x=support_x,
            support_y=target(k_support_noise, support_x),
            query_x=query_x,
            query_y=target(k_query_noise, query_x),
            coefficients=coefficients,
        )
