"""Figures of a regression run, drawn on matplotlib's Agg canvas (no display, no pyplot global state).

  predictions  a few held-out tasks: ground truth, support points, the adapted (iMAML) prediction, the
               prediction of a solve from a random init without meta-learning, and the prior theta itself
  training     meta-gradient norm and query loss over steps, log scale

`render` turns a figure into RGBA pixels once; `save_png` writes them (TensorBoard gets the same pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainer import workdir

NUM_PLOTTED_TASKS = 4
GRID_POINTS = 200


def render(fig: Figure) -> np.ndarray:
    """The figure's pixels, uint8 [H, W, 4]."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def save_png(rgba: np.ndarray, path: str) -> str:
    """Writes pixels as a PNG atomically (a reader never sees half a file); returns the path."""
    import matplotlib.image

    return workdir.write_atomically(path, lambda f: matplotlib.image.imsave(f, rgba, format="png"))


def _take(tree: Any, index: int) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[index], tree)


def predictions_figure(
    model,
    meta_params: Any,
    eval_outputs: dict[str, Any],
    tasks_cfg: ml_collections.ConfigDict,
    num_tasks: int = NUM_PLOTTED_TASKS,
) -> Figure:
    """Ground truth, support points and predictions with and without meta-learning on held-out tasks.

    `eval_outputs` is the raw output of `evaluation.Evaluator.__call__`: `tasks` (with amplitude, frequency,
    phase), `adapted` and `scratch` parameters with a leading task axis, and per-task `losses`.
    """
    tasks, losses = eval_outputs["tasks"], eval_outputs["losses"]
    num_tasks = min(num_tasks, int(np.asarray(tasks["support_x"]).shape[0]))
    dtype = np.asarray(tasks["support_x"]).dtype
    x_Gx1 = np.linspace(tasks_cfg.x_min, tasks_cfg.x_max, GRID_POINTS, dtype=dtype)[:, None]
    predict = jax.jit(lambda params: model.apply(params, jnp.asarray(x_Gx1))[:, 0])
    prior_G = np.asarray(predict(meta_params))

    cols = min(num_tasks, 2)
    rows = math.ceil(num_tasks / cols)
    fig = Figure(figsize=(6 * cols, 3.6 * rows), dpi=100, layout="constrained")
    for i in range(num_tasks):
        ax = fig.add_subplot(rows, cols, i + 1)
        amplitude, frequency, phase = (
            float(np.asarray(tasks[name])[i]) for name in ("amplitude", "frequency", "phase")
        )
        truth_G = amplitude * np.sin(frequency * x_Gx1[:, 0] + phase)
        ax.plot(x_Gx1[:, 0], truth_G, color="black", lw=2, label="ground truth")
        ax.plot(
            x_Gx1[:, 0],
            np.asarray(predict(_take(eval_outputs["adapted"], i))),
            color="tab:blue",
            lw=2,
            label="adapted from the meta-learned prior (iMAML)",
        )
        ax.plot(
            x_Gx1[:, 0],
            np.asarray(predict(_take(eval_outputs["scratch"], i))),
            color="tab:orange",
            lw=1.5,
            ls="--",
            label="without meta-learning (fit from a random init)",
        )
        ax.plot(x_Gx1[:, 0], prior_G, color="tab:gray", lw=1, ls=":", label="prior theta, not adapted")
        ax.scatter(
            np.asarray(tasks["support_x"])[i, :, 0],
            np.asarray(tasks["support_y"])[i, :, 0],
            color="tab:red",
            zorder=5,
            label="support points",
        )
        ax.set_title(
            f"held-out task {i} (A={amplitude:.2f}, f={frequency:.2f}, phase={phase:.2f})\n"
            f"query MSE: adapted {float(losses['adapted'][i]):.3g}, without meta-learning "
            f"{float(losses['scratch'][i]):.3g}, prior {float(losses['prior'][i]):.3g}",
            fontsize=9,
        )
        ax.set_xlabel("x")
        # Fits without meta-learning can swing far off; keep the ground truth readable.
        ax.set_ylim(-2.0 * max(tasks_cfg.amplitude_max, 0.1), 2.0 * max(tasks_cfg.amplitude_max, 0.1))
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9)
    return fig


def training_figure(
    steps: Sequence[int], grad_norms: Sequence[float], query_losses: Sequence[float] | None = None
) -> Figure:
    """Meta-gradient norm (and query loss) against the step, log scale; non-finite points are dropped."""
    panels = [("meta-gradient norm", grad_norms)]
    if query_losses is not None:
        panels.append(("query loss (training tasks)", query_losses))
    fig = Figure(figsize=(6 * len(panels), 3.6), dpi=100, layout="constrained")
    for i, (title, values) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        steps_arr, values_arr = np.asarray(steps, np.float64), np.asarray(values, np.float64)
        keep = np.isfinite(values_arr) & (values_arr > 0)
        ax.plot(steps_arr[keep], values_arr[keep], color="tab:blue", marker="." if keep.sum() < 50 else None)
        ax.set_yscale("log")
        ax.set_xlabel("meta-step")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    return fig


def evaluation_figures(
    model,
    config: ml_collections.ConfigDict,
    meta_params: Any,
    eval_outputs: dict[str, Any],
    series: dict[str, tuple[list[int], list[float]]] | None = None,
) -> dict[str, Figure]:
    """The figures of an evaluation: predictions (regression) and training curves (when `series` has them)."""
    figures = {}
    if config.tasks.family == "sinusoid" and "adapted" in eval_outputs:
        figures["predictions"] = predictions_figure(model, meta_params, eval_outputs, config.tasks)
    if series and series.get("grad_norm") and series["grad_norm"][0]:
        steps, grad_norms = series["grad_norm"]
        query = series.get("query_loss")
        query_losses = query[1] if query and list(query[0]) == list(steps) else None
        figures["training"] = training_figure(steps, grad_norms, query_losses)
    return figures
