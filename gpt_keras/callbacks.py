"""Keras callbacks of a training run: progress bar, checkpoints with exact resume, metrics files,
loss plot, NaN stop and text samples. One Keras "epoch" of `train` is one checkpoint interval."""

import csv
import io
import math
import sys
import time

import keras

from gpt_keras import checkpoints
from gpt_keras.data import bits_per_unit

METRIC_COLUMNS = [
    "step", "loss", "val_loss", "val_perplexity", "val_bits_per_char", "val_bits_per_byte",
    "learning_rate", "tokens_per_second", "elapsed_seconds",
]


def learning_rate(optimizer):
    """The learning rate the optimizer applies now, as a float."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class ProgressBar(keras.callbacks.Callback):
    """One progress line over all updates of the run: step, bar, interval-mean loss, learning
    rate, tokens/s (after the first, compiling step) and the time left. Redrawn in place on a
    terminal, printed every `log_every` steps otherwise. `micro_steps` `fit` batches (gradient
    accumulation) make one update."""

    def __init__(self, total_steps, start_step, tokens_per_step, micro_steps=1, log_every=50,
                 stream=None):
        super().__init__()
        self.total_steps = total_steps
        self.micro_steps = micro_steps
        self.batches = start_step * micro_steps
        self.step = start_step
        self.tokens_per_step = tokens_per_step
        self.log_every = log_every
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()

    def on_train_begin(self, logs=None):
        self.clock_step, self.clock = self.step, None

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches % self.micro_steps:
            return
        self.step = self.batches // self.micro_steps
        if self.clock is None:  # the first step includes tracing and compilation
            self.clock_step, self.clock = self.step, time.perf_counter()
        if not self.interactive and self.step % self.log_every and self.step != self.total_steps:
            return
        elapsed = time.perf_counter() - self.clock
        done = self.step - self.clock_step
        speed = done * self.tokens_per_step / elapsed if elapsed and done else 0.0
        eta = (self.total_steps - self.step) * elapsed / done if done else 0.0
        filled = int(20 * self.step / self.total_steps)
        line = (
            f"step {self.step}/{self.total_steps} [{'=' * filled}{'.' * (20 - filled)}] "
            f"loss {float(logs['loss']):.4f} | lr {learning_rate(self.model.optimizer):.2e} | "
            f"{speed:,.0f} tok/s | eta {int(eta) // 60}m{int(eta) % 60:02d}s"
        )
        end = "" if self.interactive and self.step != self.total_steps else "\n"
        print(("\r" if self.interactive else "") + line, end=end, file=self.stream, flush=True)


class StopOnNaN(keras.callbacks.Callback):
    """Stops training when the loss is not finite. The interval in progress is not checkpointed,
    so the newest checkpoint stays the last good one."""

    def __init__(self):
        super().__init__()
        self.failed_at = None

    def on_train_batch_end(self, batch, logs=None):
        if self.failed_at is None and not math.isfinite(float(logs["loss"])):
            self.failed_at = int(self.model.optimizer.iterations.numpy())
            self.model.stop_training = True


class RunState(keras.callbacks.Callback):
    """At the end of every checkpoint interval: records metrics, writes the step checkpoint (and
    `best.ckpt.npz` when the validation loss improves), rewrites `metrics.csv` and the loss plot,
    and prints a text sample. The metrics history lives in the checkpoint, so a resumed run
    continues the same files.

    Args:
        run: the `gpt_keras.training.Run` (paths, token file, config).
        state: the state restored from a checkpoint (`{"history": [...], "best_val_loss": ...}`).
        nan_stop: the run's `StopOnNaN`, consulted before writing anything.
        sample: optional `callable(model) -> str` called every `sample_every` steps.
        is_chief: only the chief writes files (multi-worker training).
    """

    def __init__(self, run, state, nan_stop, sample=None, is_chief=True):
        super().__init__()
        self.run = run
        self.history = list(state.get("history", []))
        self.best_val_loss = state.get("best_val_loss", math.inf)
        self.elapsed_before = state.get("elapsed_seconds", 0.0)
        self.nan_stop = nan_stop
        self.sample = sample
        self.is_chief = is_chief

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.interval_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.interval_ended = time.perf_counter()  # training time only, not validation

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_stop.failed_at is not None:
            return
        logs = logs or {}
        config = self.run.train_config
        step = int(self.model.optimizer.iterations.numpy())
        interval = self.interval_ended - self.interval_started
        row = {
            "step": step,
            "loss": float(logs["loss"]),
            "learning_rate": learning_rate(self.model.optimizer),
            "tokens_per_second": config.checkpoint_every * self.run.tokens_per_step / interval,
            "elapsed_seconds": self.elapsed_before + time.perf_counter() - self.started,
        }
        if "val_loss" in logs:
            row.update(validation_metrics(float(logs["val_loss"]), self.run.token_file))
        self.history.append(row)
        improved = row.get("val_loss", math.inf) < self.best_val_loss
        if improved:
            self.best_val_loss = row["val_loss"]
        if self.is_chief:
            state = {
                "step": step,
                "history": self.history,
                "best_val_loss": self.best_val_loss,
                "elapsed_seconds": row["elapsed_seconds"],
            }
            path = checkpoints.step_path(self.run.checkpoint_dir, step)
            checkpoints.save(path, self.model, self.model.optimizer, state)
            if improved:
                checkpoints.save(
                    f"{self.run.checkpoint_dir}/{checkpoints.BEST}",
                    self.model, self.model.optimizer, state,
                )
            checkpoints.prune(self.run.checkpoint_dir, config.keep_checkpoints)
            write_metrics(self.run.metrics_path, self.history)
            plot_losses(self.run.plot_path, self.history)
        if "val_loss" in row:
            print(
                f"\nstep {step}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}, "
                f"val_perplexity {row['val_perplexity']:.2f}, "
                f"val_bits_per_char {row['val_bits_per_char']:.4f}"
            )
        if self.sample is not None and config.sample_every and step % config.sample_every == 0:
            text = self.sample(self.model)
            print(f"--- sample at step {step} ---\n{text}\n---")
            if self.is_chief:
                with open(self.run.samples_path, "a", encoding="utf-8") as f:
                    f.write(f"--- step {step} ---\n{text}\n")


def validation_metrics(val_loss, token_file):
    """Validation loss (nats/token) → loss, perplexity, bits per character and per byte."""
    return {
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 700.0)),
        "val_bits_per_char": bits_per_unit(val_loss, token_file, "char"),
        "val_bits_per_byte": bits_per_unit(val_loss, token_file, "byte"),
    }


def write_metrics(path, history):
    """Rewrites `path` (CSV, one row per checkpoint interval) atomically from `history`."""
    text = io.StringIO()
    writer = csv.DictWriter(text, METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    checkpoints.atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))


def plot_losses(path, history):
    """Writes a PNG plot of training and validation loss against the step, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    steps = [row["step"] for row in history]
    axes.plot(steps, [row["loss"] for row in history], marker=".", label="training loss")
    validated = [row for row in history if "val_loss" in row]
    if validated:
        axes.plot([row["step"] for row in validated], [row["val_loss"] for row in validated],
                  marker="o", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    checkpoints.atomic_write(path, lambda f: f.write(buffer.getvalue()))
