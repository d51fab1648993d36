"""Section 3: memory of one task's meta-gradient, implicit vs unrolled, as the inner iteration cap grows.

Measured with XLA's compiled memory analysis (`jax.jit(f).lower(...).compile().memory_analysis()`), not the
process's RSS: `temp` is the scratch memory the program needs besides its arguments and outputs, which is
where reverse mode through the unrolled iterations keeps every iterate. Implicit differentiation needs only
x*, so its memory should not depend on the cap (the iMAML paper's claim); unrolled memory should grow
linearly.
"""

from __future__ import annotations

from typing import Any

import jax

from bench.settings import Problem, Settings, make_config
from bench.timing import compile_timed
from trainer import families
from trainer import meta_grad as meta_grad_lib


def run(settings: Settings, log=print) -> dict[str, Any]:
    problem = Problem.create(make_config(settings))
    task = jax.tree.map(lambda a: a[0], problem.tasks(1))
    rows = []
    for estimator in ("implicit", "unrolled"):
        for maxiter in settings.memory_maxiters:
            config = make_config(settings, meta_grad__estimator=estimator, inner__maxiter=maxiter)
            task_meta_grad = meta_grad_lib.make_task_meta_grad(
                config, problem.model, families.get_family(config)
            )
            compiled, compile_s = compile_timed(jax.jit(task_meta_grad), problem.meta_params, task)
            stats = compiled.memory_analysis()
            row = dict(estimator=estimator, maxiter=maxiter, compile_s=compile_s)
            if stats is None:
                row["error"] = "memory_analysis() unavailable on this backend"
            else:
                row.update(
                    temp_bytes=stats.temp_size_in_bytes,
                    argument_bytes=stats.argument_size_in_bytes,
                    output_bytes=stats.output_size_in_bytes,
                    alias_bytes=stats.alias_size_in_bytes,
                )
                row["total_bytes"] = (
                    row["temp_bytes"] + row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                )
            rows.append(row)
            log(
                f"  {estimator} maxiter {maxiter}: temp {row.get('temp_bytes', 'n/a')} bytes "
                f"(compile {compile_s:.1f} s)"
            )
    return dict(
        method="XLA compiled memory analysis (temp_size_in_bytes; total = temp + arguments + outputs "
        "- aliased)",
        rows=rows,
    )
