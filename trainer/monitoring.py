"""Where metrics go: `metrics.jsonl`, TensorBoard event files, and the terminal (process 0 only).

`metrics.jsonl` holds one JSON object per logged step (`"step"` plus metric names); on resume, lines
past the restored step are dropped so that no step is duplicated.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

NON_SCALAR = ("inner_iterations_max_per_device",)


def to_jsonable(value: Any) -> Any:
    value = np.asarray(value)
    if value.ndim == 0:
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            return str(item)  # JSON has no NaN/inf.
        return item
    return value.tolist()


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records with step > last_step (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class MetricsWriter:
    """Writes scalars to metrics.jsonl and TensorBoard, and a line (or a progress bar) to the terminal."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0, num_steps: int = 0,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
        if sys.stdout.isatty() and num_steps:
            from tqdm import tqdm

            self._bar = tqdm(total=num_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    @property
    def tensorboard(self):
        return self._tb

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: to_jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                value = np.asarray(value)
                if value.ndim == 0 and name not in NON_SCALAR:
                    tag = name if "/" in name else f"train/{name}"
                    self._tb.add_scalar(tag, float(value), global_step=step)
            self._tb.flush()

    def progress(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=True)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
