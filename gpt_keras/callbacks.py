"""Keras callbacks of a training run: step timer, progress bar, checkpoints with exact resume,
metrics files, loss plot, NaN stop and text samples. A Keras "epoch" of `train` ends at every step
where one of them has something to do (`training.epoch_steps`)."""

import csv
import io
import math
import os
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


class StepTimer(keras.callbacks.Callback):
    """Wall time spent inside training steps only: validation, samples, checkpoints and the first
    step of each `fit` (tracing and compilation) are left out. `seconds` and `batches` (`fit`
    batches: micro-batches with gradient accumulation) add up over the run of `fit`."""

    def __init__(self):
        super().__init__()
        self.seconds, self.batches, self.began = 0.0, 0, None

    def on_train_begin(self, logs=None):
        self.first = True

    def on_train_batch_begin(self, batch, logs=None):
        self.began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.first:  # compiles the step
            self.first = False
            return
        self.seconds += time.perf_counter() - self.began
        self.batches += 1

    def tokens_per_second(self, tokens_per_batch, since=(0.0, 0)):
        """Training throughput since the `(seconds, batches)` snapshot `since`, or None."""
        seconds, batches = self.seconds - since[0], self.batches - since[1]
        return batches * tokens_per_batch / seconds if batches and seconds > 0 else None


class ProgressBar(keras.callbacks.Callback):
    """One progress line over all updates of the run: step, bar, loss (mean since the last
    epoch of `fit`), learning rate, training tokens/s (`StepTimer`) and the time left. Redrawn in
    place on a terminal, printed every `log_every` steps otherwise. `micro_steps` `fit` batches
    (gradient accumulation) make one update."""

    def __init__(self, total_steps, start_step, tokens_per_step, timer, micro_steps=1,
                 log_every=50, stream=None):
        super().__init__()
        self.total_steps = total_steps
        self.micro_steps = micro_steps
        self.batches = start_step * micro_steps
        self.step = start_step
        self.tokens_per_step = tokens_per_step
        self.timer = timer
        self.log_every = log_every
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches % self.micro_steps:
            return
        self.step = self.batches // self.micro_steps
        if not self.interactive and self.step % self.log_every and self.step != self.total_steps:
            return
        speed = self.timer.tokens_per_second(self.tokens_per_step / self.micro_steps)
        eta = (self.total_steps - self.step) * self.tokens_per_step / speed if speed else 0.0
        filled = int(20 * self.step / self.total_steps)
        line = (
            f"step {self.step}/{self.total_steps} [{'=' * filled}{'.' * (20 - filled)}] "
            f"loss {float(logs['loss']):.4f} | lr {learning_rate(self.model.optimizer):.2e} | "
            f"{speed or 0:,.0f} tok/s | eta {int(eta) // 60}m{int(eta) % 60:02d}s"
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
    """At the end of each epoch of `fit` (see `training.epoch_steps`): adds a row to the metrics
    history every `log_every` steps and at every validation and checkpoint (training loss: mean
    of the steps since the previous row); writes the step checkpoint every `checkpoint_every`
    steps and at the last step, and `best.ckpt.npz` when the validation loss improves; rewrites
    `metrics.csv` and the loss plot after each checkpoint and validation (after a checkpoint,
    `finish_checkpoint` does these and the pruning); prints a text sample
    every `sample_every` steps and at the last step. The history lives in the checkpoint, so a
    resumed run continues the same files.

    Args:
        run: the `gpt_keras.training.Run` (paths, token file, config).
        state: the state restored from a checkpoint (`{"history": [...], "best_val_loss": ...}`).
        nan_stop: the run's `StopOnNaN`, consulted before writing anything.
        sample: optional `callable(model) -> str`.
        timer: the run's `StepTimer` (tokens/s of training steps only).
        is_chief: only the chief writes files (multi-worker training).
        start_step: the step `fit` starts from.
    """

    def __init__(self, run, state, nan_stop, sample=None, timer=None, is_chief=True,
                 start_step=0):
        super().__init__()
        self.run = run
        self.history = list(state.get("history", []))
        self.best_val_loss = state.get("best_val_loss", math.inf)
        self.elapsed_before = state.get("elapsed_seconds", 0.0)
        self.nan_stop = nan_stop
        self.sample = sample
        self.timer = timer or StepTimer()
        self.is_chief = is_chief
        self.step = start_step  # the step of the previous epoch end
        self.loss_sum, self.loss_steps = 0.0, 0  # training loss since the previous row
        self.timed = (0.0, 0)  # the timer's (seconds, batches) at the previous row

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_stop.failed_at is not None:
            return
        logs = logs or {}
        config = self.run.train_config
        step = int(self.model.optimizer.iterations.numpy())
        self.loss_sum += float(logs["loss"]) * (step - self.step)
        self.loss_steps += step - self.step
        self.step = step
        last = step == config.max_steps
        checkpoint = last or step % config.checkpoint_every == 0
        validated = "val_loss" in logs
        if not (checkpoint or validated or step % config.log_every == 0):
            return
        micro_steps = config.gradient_accumulation_steps
        row = {
            "step": step,
            "loss": self.loss_sum / self.loss_steps,
            "learning_rate": learning_rate(self.model.optimizer),
            "tokens_per_second": self.timer.tokens_per_second(
                self.run.tokens_per_step / micro_steps, self.timed),
            "elapsed_seconds": self.elapsed_before + time.perf_counter() - self.started,
        }
        self.loss_sum, self.loss_steps = 0.0, 0
        self.timed = (self.timer.seconds, self.timer.batches)
        if validated:
            row.update(validation_metrics(float(logs["val_loss"]), self.run.token_file))
        self.history.append(row)
        improved = row.get("val_loss", math.inf) < self.best_val_loss
        if improved:
            self.best_val_loss = row["val_loss"]
        if self.is_chief and (checkpoint or improved):
            state = {
                "step": step,
                "history": self.history,
                "best_val_loss": self.best_val_loss,
                "elapsed_seconds": row["elapsed_seconds"],
            }
            if checkpoint:
                path = checkpoints.step_path(self.run.checkpoint_dir, step)
                checkpoints.save(path, self.model, self.model.optimizer, state)
                finish_checkpoint(self.run, path, state)
            else:  # the best validation so far, between checkpoints
                checkpoints.save(os.path.join(self.run.checkpoint_dir, checkpoints.BEST),
                                 self.model, self.model.optimizer, state)
        if self.is_chief and validated and not checkpoint:
            write_metrics(self.run.metrics_path, self.history)
            plot_losses(self.run.plot_path, self.history)
        if validated:
            print(
                f"\nstep {step}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}, "
                f"val_perplexity {row['val_perplexity']:.2f}, "
                f"val_bits_per_char {row['val_bits_per_char']:.4f}"
            )
        if self.sample is not None and config.sample_every and (
            last or step % config.sample_every == 0
        ):
            text = self.sample(self.model)
            print(f"--- sample at step {step} ---\n{text}\n---")
            if self.is_chief:
                with open(self.run.samples_path, "a", encoding="utf-8") as f:
                    f.write(f"--- step {step} ---\n{text}\n")


def finish_checkpoint(run, path, state):
    """Completes the run directory after the step checkpoint `path`, holding `state`, was
    written: `best.ckpt.npz` becomes a copy of it if its step has the best validation loss of
    the history and the best checkpoint is older (or missing, or damaged); the step checkpoints
    are pruned to `keep_checkpoints`; `metrics.csv` and the loss plot are rewritten if they lack
    its step. Idempotent: `training.train` calls it on the newest checkpoint at every start, so
    a run killed anywhere in between is completed by the next start."""
    step, history = state["step"], state["history"]
    validated = [(row["val_loss"], row["step"]) for row in history if "val_loss" in row]
    best_path = os.path.join(run.checkpoint_dir, checkpoints.BEST)
    if validated and min(validated)[1] == step and _best_step(best_path) < step:
        checkpoints.copy(path, best_path)
    checkpoints.prune(run.checkpoint_dir, run.train_config.keep_checkpoints)
    if _last_metrics_step(run.metrics_path) < step:
        write_metrics(run.metrics_path, history)
        plot_losses(run.plot_path, history)


def _best_step(path):
    """The step of the best checkpoint at `path`; -1 if it is missing or damaged."""
    try:
        return checkpoints.read_state(path)["step"] if os.path.isfile(path) else -1
    except checkpoints.DamagedCheckpointError:
        return -1


def _last_metrics_step(path):
    """The step of the last row of the metrics file `path`; -1 if it is missing or empty."""
    if not os.path.isfile(path):
        return -1
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return int(rows[-1]["step"]) if rows else -1


def validation_metrics(val_loss, token_file):
    """Validation loss (nats/token) → loss, perplexity, bits per character and per byte."""
    return {
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 700.0)),
        "val_bits_per_char": bits_per_unit(val_loss, token_file, "char"),
        "val_bits_per_byte": bits_per_unit(val_loss, token_file, "byte"),
    }


def write_metrics(path, history):
    """Rewrites `path` (CSV, one row per `history` entry: every `log_every` steps, validation
    and checkpoint) atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    checkpoints.atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))


def plot_losses(path, history):
    """Writes a PNG plot of the training loss (every row) and validation loss (where validated)
    against the step, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    steps = [row["step"] for row in history]
    axes.plot(steps, [row["loss"] for row in history], linewidth=1, label="training loss")
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
