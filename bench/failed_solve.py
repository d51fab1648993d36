"""Replays one step's inner solves from a run's checkpoint: jaxopt's plain L-BFGS against the project's.

    python -m bench.failed_solve --workdir=runs/sinusoid_notebook --step=489

loads the meta-parameters saved at `step` (the state before update step+1), draws that update's tasks
(task i from fold_in(fold_in(task_key, step), i), exactly as training did), and solves each task's inner
problem twice: with `jaxopt.LBFGS.run` (what the trainer used before the safeguard) and with
`inner_solver.LBFGSSolver` (the safeguarded solve). Prints, per task whose plain solve did not converge,
the start objective, each solver's returned objective, residual, iterations and line-search failures, and
the query loss at each returned point. `--save=FILE.npz` writes the first such task (its support and query
sets, the meta-parameters and the inner settings): tests/data/failed_lbfgs_task.npz was written this way.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np

from trainer import families, runs
from trainer import inner_solver as inner_lib
from trainer import model as model_lib


def replay(workdir: str, step: int) -> list[dict[str, float]]:
    config, _, model, theta, _ = runs.load_run(workdir, step, None)
    family = families.get_family(config)
    dtype = model_lib.dtype_of(config)
    key = jnp.asarray(families.split_keys(config.seed)["train"], jnp.uint32)
    batch = family.sample(None, key, step, jnp.arange(config.train.meta_batch_size), dtype)
    problem, safeguarded = inner_lib.from_config(
        config, functools.partial(family.loss, model), differentiable=False
    )
    flat_objective, theta_flat, unravel = inner_lib.flat_problem(problem, theta)
    plain = jaxopt.LBFGS(
        fun=flat_objective,
        maxiter=config.inner.maxiter,
        tol=config.inner.tol,
        history_size=config.inner.history_size,
        linesearch=config.inner.linesearch,
        maxls=config.inner.maxls,
        implicit_diff=False,
    )

    @jax.jit
    def one(task):
        support, query = families.support(task), families.query(task)
        x_plain, state = plain.run(theta_flat, theta_flat, support)
        x_safe, stats = safeguarded.solve(problem, theta, theta, support)
        x_safe_flat = jax.flatten_util.ravel_pytree(x_safe)[0]
        query_loss = lambda x: family.loss(model, unravel(x), *query)
        return dict(
            start_objective=flat_objective(theta_flat, theta_flat, support),
            plain_objective=flat_objective(x_plain, theta_flat, support),
            plain_residual=jnp.linalg.norm(jax.grad(flat_objective)(x_plain, theta_flat, support)),
            plain_iterations=state.iter_num,
            plain_query_loss=query_loss(x_plain),
            safeguarded_objective=flat_objective(x_safe_flat, theta_flat, support),
            safeguarded_residual=stats.residual,
            safeguarded_iterations=stats.iterations,
            safeguarded_linesearch_failures=stats.linesearch_failures,
            safeguarded_query_loss=query_loss(x_safe_flat),
            prior_query_loss=query_loss(theta_flat),
        )

    rows = []
    for i in range(config.train.meta_batch_size):
        row = {k: float(v) for k, v in one(jax.tree.map(lambda a, i=i: a[i], batch)).items()}
        rows.append({"task": i, **row})
    return rows, config, theta_flat, batch


def save_task(path: str, config, theta_flat, batch, task: int) -> None:
    """One task's inner problem as plain arrays: enough to replay its solve without the run."""
    fields = ("l2reg", "maxiter", "tol", "history_size", "maxls")
    np.savez(
        path,
        theta=np.asarray(theta_flat),
        hidden_sizes=np.asarray(config.model.hidden_sizes),
        activation=config.model.activation,
        **{k: np.asarray(batch[k][task]) for k in ("support_x", "support_y", "query_x", "query_y")},
        **{f"inner_{k}": np.asarray(config.inner[k]) for k in fields},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--save", default="", help="write the first failed task's problem to this .npz")
    args = parser.parse_args()
    rows, config, theta_flat, batch = replay(args.workdir, args.step)
    tol = runs.load_config(args.workdir).inner.tol
    bad = [r for r in rows if not r["plain_residual"] <= tol]
    print(f"step {args.step}: {len(bad)} of {len(rows)} plain L-BFGS solves did not converge (tol {tol:g})")
    for r in bad:
        print("  " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()))
    means = {k: np.mean([r[k] for r in rows]) for k in ("plain_query_loss", "safeguarded_query_loss")}
    print("  mean query loss over the step's tasks: " + ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
    if args.save and bad:
        save_task(args.save, config, theta_flat, batch, bad[0]["task"])
        print(f"  task {bad[0]['task']} written to {args.save}")


if __name__ == "__main__":
    main()
