import csv
import dataclasses
import glob
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tracemalloc

import keras
import numpy as np
import pytest
import tensorflow as tf

from gpt_keras import GPT, GPTConfig, checkpoints
from gpt_keras.callbacks import RunState, StopOnNaN
from gpt_keras.cli import main
from gpt_keras.data import TokenFile
from gpt_keras.distribute import TrainingGPT, stack_pairs
from gpt_keras.tokenizers import CharTokenizer
from gpt_keras.training import (
    Run, TrainConfig, _check_same_settings, _score, build_optimizer, create_run, decay_groups,
    evaluate, learning_rate_schedule, load_model, train, uses_xla,
)
from tests.conftest import SHAKESPEARE

TINY_MODEL = GPTConfig.from_preset("tiny")  # context 16, 2 layers, 2 heads, 32 dims
SMALL_MODEL_FLAGS = ["--context-length", "16", "--num-layers", "2", "--num-heads", "2",
                     "--hidden-dim", "32"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_run_directory_holds_everything(corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    config = TrainConfig(batch_size=8, max_steps=40, learning_rate=1e-2, min_learning_rate=1e-3,
                         warmup_steps=5, checkpoint_every=20, eval_every=20, eval_batches=3,
                         keep_checkpoints=1, sample_every=0, log_every=20)
    run = train(run_dir, [corpus], TINY_MODEL, config, verbose=False)
    assert sorted(os.listdir(run_dir)) == sorted([
        "run.json", "tokenizer", "data", "checkpoints", "metrics.csv", "loss.png",
        "model.keras", "tensorboard",
    ])
    assert sorted(os.listdir(run.checkpoint_dir)) == ["best.ckpt.npz", "step-00000040.ckpt.npz"]
    with open(run.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(run_dir)
    assert [int(row["step"]) for row in rows] == [20, 40]
    assert float(rows[1]["loss"]) < float(rows[0]["loss"]) < math.log(run.model_config.vocab_size)
    for row in rows:
        val_loss = float(row["val_loss"])
        assert float(row["val_perplexity"]) == pytest.approx(math.exp(val_loss))
        # Character tokens: bits per character is the loss in bits.
        assert float(row["val_bits_per_char"]) == pytest.approx(val_loss / math.log(2))
    # model.keras holds the final weights (those of the last checkpoint), without optimizer.
    model = load_model(run_dir)
    reference = GPT.from_config(model.get_config())
    reference.build()
    _, state = checkpoints.load_newest(run.checkpoint_dir, reference)
    assert state["step"] == 40
    for a, b in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert getattr(model, "optimizer", None) is None
    # The same command again finds the run finished and changes nothing.
    train(run_dir, [corpus], TINY_MODEL, config, verbose=False)
    assert read_metrics(run_dir) == rows


def test_extra_callbacks_see_every_checkpoint_interval(corpus, tmp_path):
    run_dir = str(tmp_path / "run")

    class Recorder(keras.callbacks.Callback):
        """Records, at each epoch's start, how many intervals metrics.csv already holds."""

        def __init__(self):
            super().__init__()
            self.events, self.batches = [], 0

        def on_epoch_begin(self, epoch, logs=None):
            path = os.path.join(run_dir, "metrics.csv")
            self.events.append((epoch, len(read_metrics(run_dir)) if os.path.exists(path) else 0))

        def on_train_batch_end(self, batch, logs=None):
            self.batches = batch + 1

    recorder = Recorder()
    config = TrainConfig(batch_size=4, max_steps=10, checkpoint_every=5, eval_every=5,
                         eval_batches=1, sample_every=0)
    train(run_dir, [corpus], TINY_MODEL, config, verbose=False, callbacks=[recorder])
    # One epoch per checkpoint interval, each after the previous one was recorded.
    assert recorder.events == [(0, 0), (1, 1)]
    assert recorder.batches == 5


def test_evaluate_scores_every_window(corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    config = TrainConfig(batch_size=4, max_steps=10, checkpoint_every=10, eval_every=10,
                         eval_batches=1, sample_every=0)
    train(run_dir, [corpus], TINY_MODEL, config, verbose=False)
    result = evaluate(run_dir, [corpus], batch_size=64)
    model = load_model(run_dir)
    from gpt_keras.tokenizers import load_tokenizer

    ids = load_tokenizer(os.path.join(run_dir, "tokenizer")).tokenize(open(corpus).read()).numpy()
    count = (len(ids) - 1) // 16
    windows = ids[np.arange(count)[:, None] * 16 + np.arange(17)]
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    expected = model.evaluate(windows[:, :-1], windows[:, 1:], batch_size=count, verbose=0)
    assert result["tokens"] == count * 16
    assert result["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["val_bits_per_char"] == pytest.approx(expected / math.log(2), rel=1e-5)


def test_changed_settings_are_refused(corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    config = TrainConfig(batch_size=4, max_steps=10, checkpoint_every=10, eval_every=10,
                         eval_batches=1, sample_every=0)
    train(run_dir, [corpus], TINY_MODEL, config, verbose=False)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(model.num_layers, "
                                         r"train.learning_rate\)"):
        train(run_dir, [corpus], TINY_MODEL.replace(num_layers=3),
              config.__class__(**{**vars(config), "learning_rate": 5e-3}), verbose=False)


def test_xla_settings_are_compared_by_what_they_resolve_to():
    """Runs started with `xla="on"` (the default before "auto") resume under "auto" where it
    means XLA; a change that alters what runs is still refused."""
    def settings(**train):
        return {"model": dataclasses.asdict(TINY_MODEL),
                "train": dataclasses.asdict(TrainConfig(**train))}

    _check_same_settings("run", settings(xla="auto"), settings(xla="on"))
    _check_same_settings("run", settings(xla="on"), settings(xla="auto"))
    with pytest.raises(ValueError, match=r"other settings \(train.xla\)"):
        _check_same_settings("run", settings(xla="off"), settings(xla="on"))
    if not tf.config.list_physical_devices("GPU"):  # bfloat16 "auto" means no XLA on a CPU
        with pytest.raises(ValueError, match=r"other settings \(train.xla\)"):
            _check_same_settings("run", settings(xla="auto", mixed_precision="bfloat16"),
                                 settings(xla="on", mixed_precision="bfloat16"))


def test_weight_decay_groups():
    for overrides in [{}, {"position_embedding": "learned", "tie_embeddings": False},
                      {"position_embedding": "rotary"}]:
        model = GPT(**vars(TINY_MODEL.replace(**overrides)))
        model.build()
        decayed, not_decayed = decay_groups(model)
        ids = lambda variables: sorted(id(v) for v in variables)  # noqa: E731
        assert ids(decayed + not_decayed) == ids(model.trainable_variables)  # exactly one group
        assert not {id(v) for v in decayed} & {id(v) for v in not_decayed}
        names = {v.path for v in decayed}
        assert all(v.path.endswith("kernel") for v in decayed)
        assert all(not v.path.endswith("kernel") for v in not_decayed)
        assert not any("embedding" in name for name in names)
        has_head = any(name.endswith("/lm_head/kernel") for name in names)
        assert has_head == (not model.config.tie_embeddings)


def test_adamw_decays_only_the_decayed_group():
    model = GPT(**vars(TINY_MODEL))
    model.build()
    optimizer = build_optimizer(model, TrainConfig(warmup_steps=0, clip_norm=0.0))
    before = [v.numpy().copy() for v in model.trainable_variables]
    zero_gradients = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    optimizer.apply_gradients(zip(zero_gradients, model.trainable_variables))
    decayed_ids = {id(v) for v in decay_groups(model)[0]}
    for variable, old in zip(model.trainable_variables, before):
        changed = not np.array_equal(variable.numpy(), old)
        assert changed == (id(variable) in decayed_ids and np.any(old)), variable.path


def test_learning_rate_schedule_warmup_then_cosine_to_minimum():
    config = TrainConfig(max_steps=1000, warmup_steps=100, learning_rate=1e-3,
                         min_learning_rate=1e-4, checkpoint_every=100, eval_every=100)
    schedule = learning_rate_schedule(config)
    rate = lambda step: float(schedule(step))  # noqa: E731
    assert rate(0) == 0.0
    assert rate(50) == pytest.approx(5e-4)
    assert rate(100) == pytest.approx(1e-3)
    midpoint = 1e-4 + 0.5 * (1e-3 - 1e-4)  # halfway through the decay
    assert rate(550) == pytest.approx(midpoint, rel=1e-4)
    assert rate(1000) == pytest.approx(1e-4)


def test_gradient_accumulation_equals_one_large_batch():
    """`TrainingGPT.compile(gradient_accumulation_steps=2)` on batches of 4 makes the same single
    update as one batch of 8 (the optimizer counts updates, not micro-batches).

    Compared: AdamW's moments after the update, (1 - beta_1)·g and (1 - beta_2)·g², which are
    smooth in the gradient g. Summing 2 × 4 rows instead of 8 changes g by float32 rounding
    only: at most ~n·eps·max|g| for a mean of n = 8·16 token terms, so each moment is compared
    within 128·eps_f32 of its largest entry. (The weights themselves are not compared: Adam's
    first step, lr·g / (|g| + epsilon), turns a rounding difference in a tiny g into up to
    lr·|dg| / epsilon.)"""
    ids = np.random.default_rng(0).integers(0, 64, (8, 17)).astype("int32")
    config = TrainConfig(warmup_steps=0, learning_rate=1e-2, clip_norm=0.5)
    weights, results = None, []
    for accumulation, batch in [(2, 4), (1, 8)]:
        model = TrainingGPT(**vars(TINY_MODEL))
        model.build()
        weights = weights or model.get_weights()
        model.set_weights(weights)
        model.compile(build_optimizer(model, config), gradient_accumulation_steps=accumulation)
        model.fit(ids[:, :-1], ids[:, 1:], batch_size=batch, epochs=1, shuffle=False, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 1
        assert any(not np.allclose(a, b) for a, b in zip(weights, model.get_weights()))
        results.append([
            (v.path, v.numpy()) for v in model.optimizer.variables
            if v.name.endswith(("_momentum", "_velocity"))
        ])
    assert len(results[0]) == len(results[1]) == 2 * len(weights)
    for (name, accumulated), (_, one_batch) in zip(*results):
        assert np.abs(one_batch).max() > 0, name
        tolerance = 128 * np.finfo(np.float32).eps * np.abs(one_batch).max()
        np.testing.assert_allclose(accumulated, one_batch, rtol=0, atol=tolerance, err_msg=name)


def test_xla_setting_is_checked():
    with pytest.raises(ValueError, match="xla must be 'auto', 'on' or 'off'. Received: xla='yes'"):
        TrainConfig(xla="yes")
    with pytest.raises(ValueError, match="jit_compile must be True or False. Received: 'auto'"):
        model = TrainingGPT(**vars(TINY_MODEL))
        model.build()
        model.compile(build_optimizer(model, TrainConfig()), jit_compile="auto")


def test_auto_xla_leaves_bfloat16_on_a_cpu_to_onednn():
    """`xla="auto"`: XLA for float32 and float16; plain graphs for bfloat16 without a GPU."""
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert uses_xla(TrainConfig()) and uses_xla(TrainConfig(mixed_precision="float16"))
    assert uses_xla(TrainConfig(mixed_precision="bfloat16")) == gpu
    assert uses_xla(TrainConfig(mixed_precision="bfloat16", xla="on"))
    assert not uses_xla(TrainConfig(xla="off"))


def tiny_training_models(count):
    """`count` built `TrainingGPT`s of `TINY_MODEL` with the same weights, and those weights."""
    models = [TrainingGPT(**vars(TINY_MODEL)) for _ in range(count)]
    for model in models:
        model.build()
    weights = models[0].get_weights()
    for model in models[1:]:
        model.set_weights(weights)
    return models, weights


@pytest.mark.parametrize("accumulation", [1, 2])
def test_xla_steps_make_the_updates_of_plain_graphs(accumulation):
    """One replica: `jit_compile=True` (the default) compiles the whole training step with XLA,
    accumulation included, and gives the weights of plain TensorFlow graphs."""
    ids = np.random.default_rng(1).integers(0, 64, (16, 17)).astype("int32")
    config = TrainConfig(warmup_steps=0, learning_rate=1e-2, clip_norm=0.5)
    models, weights = tiny_training_models(2)
    results = []
    for model, jit_compile in zip(models, (True, False)):
        model.compile(build_optimizer(model, config), gradient_accumulation_steps=accumulation,
                      jit_compile=jit_compile)
        assert model.jit_compile == jit_compile and model._compiled_gradients is None
        model.fit(ids[:, :-1], ids[:, 1:], batch_size=4, epochs=2, shuffle=False, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 8 // accumulation
        results.append(model.get_weights())
    assert any(not np.allclose(a, b) for a, b in zip(weights, results[0]))
    # XLA fuses and reorders float32 sums, so the gradients differ by rounding; Adam's division by
    # sqrt(v) amplifies that for the few elements whose gradient is near zero. Each update moves
    # a weight by at most ~lr, so allow 0.1% of the largest total move (8 / accumulation updates).
    tolerance = 1e-3 * config.learning_rate * (8 // accumulation)
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fused_adamw_updates_like_keras_adamw(jit_compile):
    """`build_optimizer`'s `AdamW` (one fused op per variable, decay inside `update_step`) makes
    Keras' AdamW updates: 3 steps with the warmup schedule, weight decay on the matrices only
    and global-norm clipping, compared weights and moments."""
    ids = np.random.default_rng(2).integers(0, 64, (8, 17)).astype("int32")
    config = TrainConfig(warmup_steps=2, learning_rate=1e-2, clip_norm=0.5, weight_decay=0.5)
    models, weights = tiny_training_models(2)
    results = []
    for model, fused in zip(models, (True, False)):
        optimizer = build_optimizer(model, config)
        if not fused:
            optimizer = keras.optimizers.AdamW.from_config(optimizer.get_config())
            optimizer.exclude_from_weight_decay(var_list=decay_groups(model)[1])
        model.compile(optimizer, jit_compile=jit_compile)
        model.fit(ids[:, :-1], ids[:, 1:], batch_size=4, epochs=1, shuffle=False, verbose=0)
        model.fit(ids[:4, :-1], ids[:4, 1:], batch_size=4, epochs=1, shuffle=False, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 3
        results.append(([v.numpy() for v in model.variables],
                        [v.numpy() for v in model.optimizer.variables]))
    assert type(build_optimizer(model, config)).update_step is not keras.optimizers.AdamW.update_step
    assert any(not np.allclose(a, b) for a, b in zip(weights, results[0][0]))
    # The weights: rounding differences in the moments are amplified by Adam's division by
    # sqrt(v) where a gradient is near zero, but an update moves a weight by at most ~lr: allow
    # 0.1% of the 3 updates' largest move (a decay applied twice moves weights by lr·wd·|w| more).
    for fused, keras_adamw in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(fused, keras_adamw, rtol=0, atol=1e-3 * config.learning_rate * 3)
    for fused, keras_adamw in zip(results[0][1], results[1][1]):  # moments, step counter
        np.testing.assert_allclose(fused, keras_adamw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_training_step_is_traced_once(jit_compile):
    """`compile` builds the optimizer: built inside the first traced step, its variables made
    `tf.function` trace the whole step a second time (seconds of the first step)."""
    traces = []

    class Counting(TrainingGPT):
        def train_step(self, data):
            traces.append(1)
            return super().train_step(data)

    model = Counting(**vars(TINY_MODEL))
    model.build()
    model.compile(build_optimizer(model, TrainConfig()), jit_compile=jit_compile)
    assert model.optimizer.built
    ids = np.random.default_rng(0).integers(0, 64, (4, 17)).astype("int32")
    dataset = stack_pairs(tf.data.Dataset.from_tensors((ids[:, :-1], ids[:, 1:])).repeat())
    model.fit(dataset, steps_per_epoch=2, epochs=2, verbose=0)
    assert len(traces) == 1 and int(model.optimizer.iterations.numpy()) == 4


def test_fit_datasets_do_not_autotune():
    """`stack_pairs` turns tf.data's autotuning off: deleting an autotuned iterator waits out its
    tuning thread's sleep (up to a minute), so `fit` returned seconds after its last step."""
    pairs = tf.data.Dataset.from_tensors((np.zeros((2, 4), "int32"),) * 2)
    assert pairs.options().autotune.enabled is not False
    assert stack_pairs(pairs).options().autotune.enabled is False


def test_nan_loss_stops_without_checkpointing(corpus, tmp_path):
    model = GPT(**vars(TINY_MODEL))
    model.build()
    model.compile(optimizer=build_optimizer(model, TrainConfig()), loss="mse")
    model.optimizer.build(model.trainable_variables)
    run = Run(str(tmp_path), TINY_MODEL, TrainConfig(checkpoint_every=10, eval_every=10,
                                                      max_steps=10))
    nan_stop = StopOnNaN()
    state = RunState(run, {}, nan_stop)
    for callback in (nan_stop, state):
        callback.set_model(model)
    state.on_train_begin()
    state.on_epoch_begin(0)
    nan_stop.on_train_batch_end(0, {"loss": float("nan")})
    assert model.stop_training and nan_stop.failed_at == 0
    state.on_epoch_end(0, {"loss": float("nan")})
    assert not os.path.exists(run.checkpoint_dir)


def _cli(run_dir, corpus, *extra):
    return [sys.executable, "-m", "gpt_keras.cli", "train", "--data", corpus, "--run-dir", run_dir,
            *SMALL_MODEL_FLAGS, "--batch-size", "8", "--max-steps", "40", "--checkpoint-every",
            "5", "--eval-every", "5", "--eval-batches", "2", "--dropout", "0.1",
            "--sample-every", "0", *extra]


@pytest.mark.slow
def test_killed_run_resumes_on_the_same_trajectory(corpus, tmp_path):
    """A real SIGKILL after the checkpoint of step 15; the same command then finishes the run on
    exactly the loss trajectory and weights of an uninterrupted run (dropout on, so the RNG state
    must be restored too)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    whole, interrupted = str(tmp_path / "whole"), str(tmp_path / "interrupted")
    subprocess.run(_cli(whole, corpus), check=True, env=env, capture_output=True, timeout=600)

    process = subprocess.Popen(_cli(interrupted, corpus), env={**env, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # The validation line of step 15, printed after its checkpoint is written.
    for line in process.stdout:
        if line.startswith("step 15: "):
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    steps = sorted(checkpoints.step_checkpoints(os.path.join(interrupted, "checkpoints")))
    assert 15 <= steps[-1] < 40, steps  # killed mid-run
    assert not os.path.exists(os.path.join(interrupted, "model.keras"))

    subprocess.run(_cli(interrupted, corpus), check=True, env=env, capture_output=True,
                   timeout=600)
    expected, resumed = read_metrics(whole), read_metrics(interrupted)
    assert [row["step"] for row in resumed] == [str(s) for s in range(5, 45, 5)]
    for a, b in zip(expected, resumed):
        for key in ("loss", "val_loss", "learning_rate"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), (a["step"], key)
    for a, b in zip(load_model(whole).weights, load_model(interrupted).weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def _write(path, content, mode="w"):
    with open(path, mode) as f:
        f.write(content)
    return str(path)


@pytest.mark.parametrize("setup, extra, message", [
    (lambda d: str(d / "missing.txt"), [], "missing.txt: no such file or directory"),
    (lambda d: _write(d / "empty.txt", ""), [], "empty.txt: the file is empty"),
    (lambda d: (os.makedirs(d / "nothing"), str(d / "nothing"))[1], [],
     "nothing: the directory holds no text file"),
    (lambda d: _write(d / "bad.txt", b"abc\xff\n" * 100, "wb"), [],
     "bad.txt: invalid UTF-8 at byte offset 3"),
    (lambda d: _write(d / "short.txt", "to be or not\n"), [],
     "training split has 11 tokens, fewer than one window"),
    (lambda d: _write(d / "ok.txt", "to be or not to be\n" * 50), ["--tokenizer", "bpe",
     "--vocab-size", "200"], "--vocab-size must be an int of at least 257"),
    # Model settings are checked before the run directory is created (issue 11, point 4).
    (lambda d: _write(d / "ok.txt", "to be or not to be\n" * 50), ["--num-heads", "3"],
     "--hidden-dim must be divisible by "
     "--num-heads. Received: --hidden-dim 32, --num-heads 3"),
    (lambda d: _write(d / "ok.txt", "to be or not to be\n" * 50), ["--dropout", "2"],
     "--dropout must be in [0, 1). Received: --dropout 2.0"),
    (lambda d: _write(d / "ok.txt", "to be or not to be\n" * 50), ["--context-length", "0"],
     "argument --context-length: expected an integer >= 1, received 0"),
    (lambda d: _write(d / "ok.txt", "to be or not to be\n" * 50), ["--keep-checkpoints", "0"],
     "argument --keep-checkpoints: expected an integer >= 1, received 0"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, capsys, setup, extra, message):
    data_path = setup(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", data_path, "--run-dir", str(run_dir), *SMALL_MODEL_FLAGS,
              "--max-steps", "10", *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("gpt-keras: error: ") and error.count("\n") == 1, error
    assert message in error
    assert not run_dir.exists()


def test_default_corpus_without_network_gives_the_cause_and_leaves_nothing(tmp_path,
                                                                          monkeypatch):
    from gpt_keras import cli

    monkeypatch.setattr(cli, "SHARED_CORPUS", str(tmp_path / "absent.txt"))
    with socket.socket() as closed:  # a local port that refuses connections, found offline
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(cli, "DEFAULT_CORPUS_URL", f"http://127.0.0.1:{port}/input.txt")
    with pytest.raises(ValueError) as error:
        cli.default_corpus(cache_dir=str(tmp_path / "keras"))
    assert "Connection refused" in str(error.value) and "Pass --data PATH" in str(error.value)
    assert not os.path.exists(tmp_path / "keras" / "gpt_keras")  # no empty cache directory


def test_fine_tuning_starts_from_a_run_and_freezes_blocks(corpus, tmp_path):
    config = TrainConfig(batch_size=8, max_steps=20, learning_rate=1e-2, warmup_steps=2,
                         checkpoint_every=20, eval_every=20, eval_batches=2, sample_every=0,
                         log_every=20)
    base = str(tmp_path / "base")
    train(base, [corpus], TINY_MODEL, config, verbose=False)
    tuned = str(tmp_path / "tuned")
    frozen = TrainConfig(**{**vars(config), "freeze_blocks": 1, "learning_rate": 1e-3})
    train(tuned, [corpus], GPTConfig.from_preset("shakespeare-char"), frozen, verbose=False,
          init_from=base)
    from gpt_keras.tokenizers import load_tokenizer

    assert (load_tokenizer(os.path.join(tuned, "tokenizer")).describe()
            == load_tokenizer(os.path.join(base, "tokenizer")).describe())
    before, after = load_model(base), load_model(tuned)
    assert after.config == before.config  # the source's architecture, not --preset's
    for layer, same in [(0, True), (1, False)]:
        for a, b in zip(before.blocks[layer].weights, after.blocks[layer].weights):
            assert np.array_equal(a.numpy(), b.numpy()) == same, (layer, a.path)
    # It continues from the trained weights: far below the untrained loss from the start.
    assert float(read_metrics(tuned)[0]["val_loss"]) <= float(read_metrics(base)[0]["val_loss"])
    with pytest.raises(ValueError, match="--freeze-blocks 3 is more than the model's 2 blocks"):
        train(str(tmp_path / "bad"), [corpus], TINY_MODEL,
              TrainConfig(**{**vars(config), "freeze_blocks": 3}), verbose=False, init_from=base)


def test_any_max_steps_with_every_event_at_its_own_cadence(corpus, tmp_path):
    """13 steps (a prime): checkpoints every 5 and at the end, validation every 4 and at the end,
    samples every 6 and at the end, a training-loss row every 2 steps and at every other event,
    each the mean of the per-step losses since the previous row."""
    run_dir = str(tmp_path / "run")
    config = TrainConfig(batch_size=4, max_steps=13, checkpoint_every=5, eval_every=4,
                         sample_every=6, log_every=2, eval_batches=1, warmup_steps=2,
                         keep_checkpoints=5)
    sampled = []

    def sample(model):
        sampled.append(int(model.optimizer.iterations.numpy()))
        return "text"

    class StepLosses(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses = {}

        def on_epoch_end(self, epoch, logs=None):  # epochs of one step here: gcd(2, 4, 5, 6, 13)
            self.losses[int(self.model.optimizer.iterations.numpy())] = float(logs["loss"])

    recorder = StepLosses()
    run = train(run_dir, [corpus], TINY_MODEL, config, sample=sample, verbose=False,
                callbacks=[recorder])
    assert sorted(checkpoints.step_checkpoints(run.checkpoint_dir)) == [5, 10, 13]
    rows = read_metrics(run_dir)
    assert [int(row["step"]) for row in rows] == [2, 4, 5, 6, 8, 10, 12, 13]
    assert [int(row["step"]) for row in rows if row["val_loss"]] == [4, 8, 12, 13]
    assert sampled == [6, 12, 13]
    assert sorted(recorder.losses) == list(range(1, 14))
    previous = 0
    for row in rows:
        step = int(row["step"])
        expected = np.mean([recorder.losses[s] for s in range(previous + 1, step + 1)])
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-6), step
        previous = step
    assert sorted(os.listdir(run_dir)).count("samples.txt") == 1


def test_step_timer_counts_training_steps_only(monkeypatch):
    """tokens/s of the progress bar and metrics.csv: the first (compiling) step and the time
    between steps (validation, samples, checkpoints) are left out."""
    from gpt_keras import callbacks

    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    timer = callbacks.StepTimer()
    timer.on_train_begin()
    for seconds, pause in [(20.0, 0.0), (0.5, 0.0), (0.5, 30.0), (1.0, 0.0)]:
        timer.on_train_batch_begin(0)
        now[0] += seconds
        timer.on_train_batch_end(0)
        now[0] += pause  # e.g. a validation after the step
    assert (timer.seconds, timer.batches) == (2.0, 3)
    assert timer.tokens_per_second(100) == pytest.approx(150.0)
    assert timer.tokens_per_second(100, since=(0.5, 1)) == pytest.approx(100 * 2 / 1.5)
    assert timer.tokens_per_second(100, since=(2.0, 3)) is None


def _tiny_cli(run_dir, corpus, *extra):
    return ["train", "--data", corpus, "--run-dir", run_dir, *SMALL_MODEL_FLAGS,
            "--batch-size", "4", "--eval-batches", "1", "--sample-every", "0",
            "--warmup-steps", "2", "--learning-rate", "0.01", *extra]


def test_a_finished_run_trains_further_with_a_larger_max_steps(corpus, tmp_path, capsys):
    """nanoGPT's "resume with a larger max_iters": 10 steps, then the same command with
    --max-steps 20 (and another validation cadence), gives the losses and weights of one 20-step
    run that decays over 10 steps (--decay-steps 10), then stays at the minimum rate."""
    further, whole = str(tmp_path / "further"), str(tmp_path / "whole")
    main(_tiny_cli(further, corpus, "--max-steps", "10", "--checkpoint-every", "5"))
    main(_tiny_cli(further, corpus, "--max-steps", "20", "--checkpoint-every", "5",
                   "--eval-every", "10", "--keep-checkpoints", "2"))
    out = capsys.readouterr().out
    assert "Resuming from the checkpoint of step 10; training to step 20." in out
    assert "The learning rate stays at --min-learning-rate 0.0001 after --decay-steps 10." in out
    main(_tiny_cli(whole, corpus, "--max-steps", "20", "--checkpoint-every", "5",
                   "--decay-steps", "10"))
    expected, resumed = read_metrics(whole), read_metrics(further)
    assert [row["step"] for row in resumed] == [row["step"] for row in expected]
    for a, b in zip(expected, resumed):
        for key in ("loss", "learning_rate"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), (a["step"], key)
    assert float(resumed[-1]["learning_rate"]) == pytest.approx(1e-4)
    for a, b in zip(load_model(whole).weights, load_model(further).weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(SystemExit):  # the trajectory's settings still may not change
        main(_tiny_cli(further, corpus, "--max-steps", "30", "--decay-steps", "30"))
    assert "holds a run with other settings (--decay-steps)" in capsys.readouterr().err


def test_ctrl_c_prints_one_line_and_the_same_command_resumes(corpus, tmp_path, capsys,
                                                             monkeypatch):
    """Ctrl-C (a KeyboardInterrupt after the step-10 checkpoint) ends with one line saying how to
    resume; every phase of the start prints a line; the resumed run says from which step."""
    from gpt_keras import callbacks

    run_dir = str(tmp_path / "run")
    original = callbacks.RunState.on_epoch_end

    def interrupted(self, epoch, logs=None):
        original(self, epoch, logs)
        if int(self.model.optimizer.iterations.numpy()) == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.RunState, "on_epoch_end", interrupted)
    command = _tiny_cli(run_dir, corpus, "--max-steps", "15", "--checkpoint-every", "5")
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    captured = capsys.readouterr()
    assert exit_info.value.code == 130
    assert captured.err == ("gpt-keras: interrupted; re-run the same command to resume from the "
                            "checkpoint of step 10.\n")
    phases = ["Corpus: " + corpus, "Training the char tokenizer...",
              f"Tokenizing the corpus into {run_dir}/data...", "Compiling the training step"]
    lines = captured.out.splitlines()
    starts = [next(i for i, line in enumerate(lines) if line.startswith(p)) for p in phases]
    assert starts == sorted(starts)
    monkeypatch.setattr(callbacks.RunState, "on_epoch_end", original)
    main(command)
    out = capsys.readouterr().out
    assert "Resuming from the checkpoint of step 10; training to step 15." in out
    assert f"Saving the final weights to {run_dir}/model.keras..." in out
    assert [int(row["step"]) for row in read_metrics(run_dir)] == [5, 10, 15]


# -- A run directory that stays consistent -----------------------------------------------------

RUN_CONFIG = TrainConfig(batch_size=4, max_steps=10, decay_steps=10, checkpoint_every=5,
                         eval_every=5, eval_batches=1, keep_checkpoints=1, sample_every=0,
                         warmup_steps=2, learning_rate=1e-2)


def _state(path):
    with np.load(path) as saved:
        return json.loads(saved["state"].tobytes().decode("utf-8"))


def _dead_pid():
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A finished 10-step run (checkpoints at steps 5 and 10, both kept); tests copy it."""
    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    train(run_dir, [corpus], TINY_MODEL, dataclasses.replace(RUN_CONFIG, keep_checkpoints=2),
          verbose=False)
    return run_dir


def test_a_start_completes_a_run_killed_after_its_last_checkpoint(finished_run, corpus,
                                                                   tmp_path):
    """The files a kill right after writing the step-10 checkpoint leaves (before the pruning,
    the best checkpoint and metrics.csv): the next start completes all three."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run, run_dir)
    directory = os.path.join(run_dir, "checkpoints")
    history = _state(checkpoints.step_path(directory, 10))["history"]
    assert min((row["val_loss"], row["step"]) for row in history)[1] == 10  # step 10 is best
    shutil.copy(checkpoints.step_path(directory, 5), os.path.join(directory, checkpoints.BEST))
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        lines = f.readlines()
    _write(os.path.join(run_dir, "metrics.csv"), "".join(lines[:2]))  # the header and step 5

    train(run_dir, [corpus], TINY_MODEL, RUN_CONFIG, verbose=False)
    assert sorted(checkpoints.step_checkpoints(directory)) == [10]  # keep_checkpoints=1
    best = _state(os.path.join(directory, checkpoints.BEST))
    assert (best["step"], best["best_val_loss"]) == (10, history[-1]["val_loss"])
    assert read_metrics(run_dir) == read_metrics(finished_run)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(finished_run,
                                                                          tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run, run_dir)
    os.unlink(os.path.join(run_dir, "model.keras"))
    directory = os.path.join(run_dir, "checkpoints")
    newest, older = checkpoints.step_path(directory, 10), checkpoints.step_path(directory, 5)
    with open(newest, "r+b") as f:  # a disk that filled up while the file was written
        f.truncate(os.path.getsize(newest) // 2)
    expected = GPT(**vars(load_model(finished_run).config))
    expected.build()
    checkpoints.load(older, expected)
    with pytest.warns(UserWarning, match=f"{newest} is damaged .*; skipping it, falling back"):
        model = load_model(run_dir)
    for a, b in zip(model.weights, expected.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    with open(older, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=(
            r"Every step checkpoint in .*/checkpoints is damaged \(truncated or corrupted\): "
            r"step-00000010.ckpt.npz, step-00000005.ckpt.npz. Restore them from a backup, or "
            r"delete them to train from the start.")):
        load_model(run_dir)


def test_a_start_removes_the_temporaries_of_killed_writers_only(finished_run, corpus,
                                                                 tmp_path):
    """A child process is killed while it writes a checkpoint, while `prepare_tokens` writes
    into a temporary directory, and while `model.keras` is saved (nested, so that one kill
    leaves all three); the next start removes what it left, not what live writers write."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run, run_dir)
    child = f"""
import os, signal
from gpt_keras import GPT, GPTConfig, checkpoints, data, training
run_dir = {run_dir!r}

def save_and_die(self, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)

class Tokenizer:
    vocab_size, end_of_text_id = 10, 0

    def tokenize(self, text):
        GPT.save = save_and_die
        model = GPT(**vars(GPTConfig.from_preset("tiny")))
        model.build()
        training._save_inference_model(model, os.path.join(run_dir, "model.keras"))

def write(f):
    f.write(b"half a checkpoint")
    f.flush()
    data.prepare_tokens([{SHAKESPEARE!r}], Tokenizer(), os.path.join(run_dir, "data2"))

checkpoints.atomic_write(os.path.join(run_dir, "checkpoints", "step-00000099.ckpt.npz"), write)
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]

    def hidden():
        return sorted(os.path.relpath(p, run_dir)
                      for p in glob.glob(f"{run_dir}/.*") + glob.glob(f"{run_dir}/*/.*"))

    assert len(hidden()) == 3, hidden()  # .tmp-*.keras, .tokens-*, checkpoints/.tmp-*
    live = [f".tmp-{os.getpid()}@{socket.gethostname()}-abcdefgh",  # this process
            f".tokens-{_dead_pid()}@another-host-abcdefgh",  # unknowable: kept
            os.path.join("checkpoints", f".tmp-{os.getpid()}@{socket.gethostname()}-ijklmnop")]
    for name in live:
        _write(os.path.join(run_dir, name), "being written")
    train(run_dir, [corpus], TINY_MODEL, RUN_CONFIG, verbose=False)
    assert hidden() == sorted(live)


def test_streamed_evaluation_memory_does_not_grow_with_the_split(tmp_path):
    """`evaluate` scores a 2M-token validation split holding one batch of windows at a time
    (the old code built every window at once: 8 bytes of indices and 4 of ids per token)."""
    context, batch_size, num_tokens = 64, 256, 2_000_000
    directory = str(tmp_path / "data")
    os.makedirs(directory)
    ids = np.random.default_rng(0).integers(0, 2, num_tokens, dtype=np.uint16)
    ids.tofile(os.path.join(directory, "tokens.bin"))
    token_file = TokenFile(directory, "uint16", 0, num_tokens, num_tokens, num_tokens, "")

    class UniformModel:  # what `_score` calls: uniform logits over 2 ids
        config = GPTConfig(vocab_size=2, context_length=context)

        def __call__(self, inputs):
            return np.zeros(inputs.shape + (2,), np.float32)

    del ids
    tracemalloc.start()
    try:
        result = _score(UniformModel(), token_file, token_file.tokens(), batch_size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    count = (num_tokens - 1) // context
    assert result["tokens"] == count * context
    # Each batch's loss is a float32 sum of batch_size * context terms.
    assert result["val_loss"] == pytest.approx(
        math.log(2), rel=batch_size * context * float(np.finfo(np.float32).eps))
    # One batch: int32 ids (inputs and targets) and float32 logits, a few copies of each (all
    # windows at once: 12 bytes per token, 24 MB).
    assert peak < 8 * batch_size * context * (2 * 4 + 2 * 4), peak


def test_train_restores_the_dtype_policy_and_random_states(corpus, tmp_path):
    """The global dtype policy and Python's and NumPy's random states are as before `train`,
    which trains in its configured precision whatever the global policy."""

    class Policy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.name = self.model.dtype_policy.name
            self.optimizer = type(self.model.optimizer).__name__

    policy = Policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.random())
    random.seed(5)
    np.random.seed(5)
    config = dataclasses.replace(RUN_CONFIG, max_steps=1, mixed_precision="float16")
    train(str(tmp_path / "run"), [corpus], TINY_MODEL, config, verbose=False, callbacks=[policy])
    assert (policy.name, policy.optimizer) == ("mixed_float16", "LossScaleOptimizer")
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert (random.random(), np.random.random()) == expected


def test_a_damaged_run_json_or_model_keras_is_named(tmp_path):
    model = GPT(**dataclasses.asdict(TINY_MODEL))
    model.build()
    run_dir = str(tmp_path / "run")
    create_run(run_dir, model, CharTokenizer.train("abc"), {"test": "damage"})
    model_path = os.path.join(run_dir, "model.keras")
    with open(model_path, "r+b") as f:
        f.truncate(os.path.getsize(model_path) // 2)
    with pytest.raises(ValueError, match="model.keras cannot be read .* damaged or truncated"):
        load_model(run_dir)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="run.json is not valid JSON"):
        load_model(run_dir)
