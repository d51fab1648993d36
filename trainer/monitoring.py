"""Where metrics go: `metrics.jsonl`, TensorBoard event files, figures, and the terminal (process 0 only).

`metrics.jsonl` holds one JSON object per logged step (`"step"` plus metric names); on resume, lines
past the restored step are dropped so that no step is duplicated. TensorBoard event files go to
`<workdir>/tensorboard` (`tensorboard --logdir <workdir>` or the runs folder shows them), figures as
images there and as PNG files in `<workdir>/figures`. On the terminal: a progress bar (steps, ETA, loss)
when stdout is a terminal, plain log lines otherwise.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import threading
from typing import Any

import jax
import ml_collections
import numpy as np

from trainer import config as config_lib
from trainer import workdir as workdir_lib

NON_SCALAR = ("inner_iterations_max_per_device",)
# TensorBoard groups charts by the part of the tag before "/".
TIMING_METRICS = ("step_time_s", "tasks_per_s", "compile_time_s", "first_step_time_s", "eval_time_s")
# jax.monitoring events whose durations add up to the time spent tracing, lowering and compiling.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(workdir, "tensorboard")


def figures_dir(workdir: str) -> str:
    return os.path.join(workdir, "figures")


def tensorboard_tag(name: str) -> str:
    """train/<name> for training scalars, inner/<...> for inner-solver health, perf/<...> for timings."""
    if "/" in name:
        return name
    if name.startswith("inner_"):
        return "inner/" + name[len("inner_") :]
    if name in TIMING_METRICS:
        return "perf/" + name
    return "train/" + name


def to_jsonable(value: Any) -> Any:
    value = np.asarray(value)
    if value.ndim == 0:
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            return str(item)  # JSON has no NaN/inf.
        return item
    return value.tolist()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records with step > last_step (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        workdir_lib.write_atomically(path, lambda f: f.write("".join(kept).encode()))


def append_line(path: str, line: str) -> None:
    """Appends one line to `path`; a failed write (a full disk) is undone, so no partial line remains.

    Raises the OSError with `path` as its filename.
    """
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError as e:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        raise OSError(e.errno, e.strerror, path) from e
    finally:
        os.close(fd)


class _WriterThreads:
    """Exceptions of tensorboardX's background writer threads, kept for the main thread instead of printed.

    tensorboardX writes events in a daemon thread (`EventFileWriter._worker`, tensorboardX 2.6) that dies
    silently on a full disk; `MetricsWriter` registers its thread here and re-raises what it caught.
    """

    errors: dict[threading.Thread, BaseException] = {}
    watched: set[threading.Thread] = set()
    _previous = None

    @classmethod
    def watch(cls, thread: threading.Thread | None) -> None:
        if thread is None:
            return
        if cls._previous is None:
            cls._previous = threading.excepthook
            threading.excepthook = cls._hook
        cls.watched.add(thread)

    @classmethod
    def _hook(cls, args) -> None:
        if args.thread in cls.watched:
            cls.errors[args.thread] = args.exc_value
        else:
            cls._previous(args)

    @classmethod
    def pop_error(cls, thread: threading.Thread | None) -> BaseException | None:
        return cls.errors.pop(thread, None)

    @classmethod
    def forget(cls, thread: threading.Thread | None) -> None:
        cls.watched.discard(thread)
        cls.errors.pop(thread, None)


def metric_series(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over records (dicts with "step"); "nan"/"inf" strings become floats."""
    steps, values = [], []
    for record in records:
        if name in record and np.ndim(record[name]) == 0:
            steps.append(int(record["step"]))
            values.append(float(record[name]))
    return steps, values


# Beside the maths fields (config.maths_fields), the sizes that define an experiment in TensorBoard's HParams tab.
HPARAM_SIZES = ("train.num_steps", "eval.num_tasks")


def experiment_hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """The fields that define the experiment (the maths fields and the main sizes), as TensorBoard hparams;
    where things are written, how often and on how many devices are left out."""
    names = set(config_lib.maths_fields(config)) | set(HPARAM_SIZES)
    return {name: value for name, value in flat_hparams(config).items() if name in names}


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """The config as TensorBoard hparams: dotted names, sequences as strings."""
    return {
        name: value
        if isinstance(value, (bool, int, float, str))
        else str(list(value) if isinstance(value, tuple) else value)
        for name, value in config_lib.flatten(config).items()
    }


class CompileTimer:
    """Seconds JAX spends tracing, lowering and compiling (persistent-cache reads included) while active.

    Listens to `jax.monitoring` duration events, so it counts every jit compiled in this process while
    started, and nothing else: dispatch and device time are excluded.
    """

    def __init__(self):
        self.seconds = 0.0
        self._active = False

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration

    def start(self) -> CompileTimer:
        if not self._active:
            jax.monitoring.register_event_duration_secs_listener(self._listener)
            self._active = True
        return self

    def record(self, seconds: float) -> None:
        """Adds time JAX does not report as compilation (loading a saved executable)."""
        self.seconds += seconds

    def stop(self) -> float:
        if self._active:
            jax.monitoring.unregister_event_duration_listener(self._listener)
            self._active = False
        return self.seconds

    def __enter__(self) -> CompileTimer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MetricsWriter(workdir_lib.Closing):
    """Writes scalars to metrics.jsonl and TensorBoard, figures, and lines or a progress bar to the terminal.

    With `enabled=False` (every process but 0) it writes nothing anywhere.
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        resume_step: int = 0,
        num_steps: int = 0,
        tensorboard: bool = True,
        stream=None,
    ):
        self.enabled = enabled
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.resume_step = resume_step
        self._stream = stream if stream is not None else sys.stdout
        self._tb = None
        self._tb_thread = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides events a previous, longer attempt wrote past the resumed step.
            # A queue far longer than one write's events: tensorboardX's put() blocks on a full queue, which
            # would hang the run if its thread died; `_flush_tensorboard` notices a dead thread at every write.
            self._tb = SummaryWriter(
                logdir=tensorboard_dir(workdir), purge_step=resume_step + 1, max_queue=1000
            )
            self._tb_thread = getattr(self._tb.file_writer.event_writer, "_worker", None)
            _WriterThreads.watch(self._tb_thread)
        if num_steps and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=num_steps,
                initial=resume_step,
                unit="step",
                dynamic_ncols=True,
                file=self._stream,
                desc="meta-training",
            )

    @property
    def tensorboard(self):
        return self._tb

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: to_jsonable(v) for k, v in metrics.items()})
        append_line(self.path, json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                value = np.asarray(value)
                if value.ndim == 0 and name not in NON_SCALAR:
                    self._tb.add_scalar(tensorboard_tag(name), float(value), global_step=step)
            self._flush_tensorboard()

    def _flush_tensorboard(self, close: bool = False) -> None:
        """Flushes (or closes) the event file; a failed write, here or in tensorboardX's thread, raises
        OSError naming the folder."""
        error = None
        try:
            self._tb.close() if close else self._tb.flush()
        except OSError as e:
            error = e
        error = _WriterThreads.pop_error(self._tb_thread) or error
        if error is None and not close and self._tb_thread is not None and not self._tb_thread.is_alive():
            error = OSError(errno.EIO, "the TensorBoard writer thread stopped")
        if error is not None:
            self._abandon_tensorboard()
            directory = tensorboard_dir(self.workdir)
            if isinstance(error, OSError):
                raise OSError(error.errno, error.strerror, directory) from error
            raise OSError(errno.EIO, f"TensorBoard events not written: {error}", directory) from error

    def _abandon_tensorboard(self) -> None:
        """Stops using a writer that failed, without its atexit hook retrying (and printing a traceback)."""
        events = self._tb.file_writer.event_writer
        events._closed = True  # tensorboardX 2.6: close() and its atexit hook then do nothing.
        self._tb, self._tb_thread = None, None  # The thread stays watched: its later errors stay quiet.

    def series(self, history: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a metric over the run: records logged up to the resumed step, then `history`."""
        earlier = [r for r in read_jsonl(self.path) if r["step"] <= self.resume_step] if self.enabled else []
        return metric_series(earlier + list(history), name)

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        """The resolved config as a text panel (JSON indented so that TensorBoard's markdown keeps it)."""
        if self._tb is None:
            return
        text = json.dumps(config_lib.to_dict(config), indent=2, sort_keys=True)
        self._tb.add_text("config", "\n".join("    " + line for line in text.splitlines()), global_step=0)
        self._flush_tensorboard()

    def write_hparams(self, config: ml_collections.ConfigDict, final_metrics: dict[str, float]) -> None:
        """The experiment's fields as hparams with the final held-out metrics, in this run (not a sub-run).

        TensorBoard's HParams tab reads each metric's value from this run's scalar of the same tag,
        which `write` logged at the last evaluation.
        """
        if self._tb is None:
            return
        from tensorboardX.summary import hparams

        metrics = {k: float(v) for k, v in final_metrics.items() if np.ndim(v) == 0}
        experiment, session_start, session_end = hparams(experiment_hparams(config), metrics)
        for summary in (experiment, session_start, session_end):
            self._tb.file_writer.add_summary(summary)
        self._flush_tensorboard()

    def write_figures(self, step: int, figures: dict[str, Any], directory: str | None = None) -> list[str]:
        """Each figure as a TensorBoard image `figures/<name>` and as `<directory>/<name>_step_<step>.png`."""
        if not self.enabled:
            return []
        from trainer import figures as figures_lib

        directory = directory or figures_dir(self.workdir)
        paths = []
        for name, fig in figures.items():
            rgba = figures_lib.render(fig)
            paths.append(figures_lib.save_png(rgba, os.path.join(directory, f"{name}_step_{step}.png")))
            if self._tb is not None:
                self._tb.add_image(f"figures/{name}", rgba[..., :3], global_step=step, dataformats="HWC")
        if self._tb is not None:
            self._flush_tensorboard()
        return paths

    def progress(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self._bar.update(step - self._bar.n)  # update(), not n=: tqdm's rate and ETA follow update().

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        """Finishes the progress bar and the event files; raises OSError if events could not be written."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._flush_tensorboard(close=True)  # Raises if the events could not all be written.
            _WriterThreads.forget(self._tb_thread)
            self._tb, self._tb_thread = None, None
