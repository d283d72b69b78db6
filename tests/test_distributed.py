"""Training under `tf.distribute`: 2 logical CPU replicas (`MirroredStrategy`) and 2 worker
processes (`MultiWorkerMirroredStrategy`) give the losses and weights of one replica with the same
global batch.

Training runs in subprocesses: the CPU must be split into logical devices, or the cluster joined,
before TensorFlow initialises in a process. Gradient clipping is active in these runs (clip norm
0.5, gradient norms above it): Keras 3.15 on its own clips each replica's partial gradient, which
a loss-only comparison at loose tolerance would miss, and its gradient accumulation fails under
any strategy (see `gpt_keras.distribute`).
"""

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL_FLAGS = ["--context-length", "16", "--num-layers", "2", "--num-heads", "2",
                     "--hidden-dim", "32"]
# Tolerances. Splitting a batch over replicas only changes the order of float32 sums, so the
# runs agree to rounding (measured: losses equal to all digits, weights within 2e-7).
LOSS_RTOL = 1e-5  # per-row training/validation losses in metrics.csv
WEIGHT_ATOL = 1e-5  # every model variable after the last step
TIMEOUT = 150  # seconds per training subprocess (about 10 s each on 2 cores)


def _env(**extra):
    env = {key: value for key, value in os.environ.items()
           if key not in ("TF_CONFIG", "GPT_KERAS_WORKER_TIMEOUT")}
    # CPU only, so the runs are the same on a machine with GPUs.
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _run(command, **extra_env):
    result = subprocess.run(command, cwd=REPO, env=_env(**extra_env), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _assert_same_losses(expected_dir, actual_dir):
    expected, actual = _read_metrics(expected_dir), _read_metrics(actual_dir)
    assert [row["step"] for row in actual] == [row["step"] for row in expected]
    for a, b in zip(expected, actual):
        for key in ("loss", "val_loss"):  # val_loss: only in rows of validation steps
            assert (a[key] == "") == (b[key] == ""), (a["step"], key)
            if a[key]:
                assert float(b[key]) == pytest.approx(float(a[key]), rel=LOSS_RTOL), (a["step"],
                                                                                      key)


def _final_variables(run_dir):
    """The model variables of the newest checkpoint of `run_dir`, in `model.variables` order."""
    newest = max(glob.glob(os.path.join(run_dir, "checkpoints", "step-*.ckpt.npz")))
    with np.load(newest) as saved:
        return [saved[key] for key in sorted(saved.files) if key.startswith("model/")]


def _assert_close(expected, actual):
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        np.testing.assert_allclose(b, a, rtol=0, atol=WEIGHT_ATOL)


# --- MirroredStrategy over logical CPU devices, through the command line -------------------


def _cli(run_dir, corpus, *extra):
    return [sys.executable, "-m", "gpt_keras.cli", "train", "--data", corpus, "--run-dir", run_dir,
            *SMALL_MODEL_FLAGS, "--max-steps", "16", "--checkpoint-every", "8", "--eval-every",
            "8", "--eval-batches", "2", "--warmup-steps", "2", "--learning-rate", "3e-3",
            "--clip-norm", "0.5", "--sample-every", "0", "--dropout", "0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("batch_flags", [
    ["--batch-size", "8"],
    ["--batch-size", "4", "--gradient-accumulation-steps", "2"],
    ["--batch-size", "8", "--xla", "off"],
], ids=["batch8", "batch4x2-accumulated", "batch8-no-xla"])
def test_two_replicas_match_one(corpus, tmp_path, batch_flags):
    """With XLA (the default), one replica compiles its whole step and two replicas compile
    each replica's forward and backward pass (`GlobalBatchSteps.compile`): same numbers. Without
    dropout only, as the README states: with dropout each replica draws its own slice's masks."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(_cli(one, corpus, *batch_flags))
    _run(_cli(two, corpus, *batch_flags, "--replicas", "2"))
    _assert_same_losses(one, two)
    _assert_close(_final_variables(one), _final_variables(two))


def test_batch_not_divisible_by_replicas_is_one_line_error(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(_cli(str(run_dir), corpus, "--batch-size", "3", "--replicas", "2"),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.endswith(
        "gpt-keras: error: The global batch size 3 does not divide over 2 replicas; use a "
        "multiple of 2.\n"
    ), result.stderr[-2000:]
    assert not run_dir.exists()


# --- MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 ---------------------------

TRAIN_SETTINGS = dict(batch_size=8, max_steps=16, checkpoint_every=8, eval_every=8,
                      eval_batches=2, warmup_steps=2, learning_rate=3e-3, clip_norm=0.5,
                      sample_every=16)


def worker_main():
    """Subprocess entry point: `train` the tiny model on `argv[1]` into `argv[2]` and, at the last
    step, save this process's `model.variables` to `argv[3]` (`.npz`) through the `sample` hook,
    which every worker calls (non-chief workers write nothing into the run directory)."""
    from gpt_keras import GPTConfig
    from gpt_keras.training import TrainConfig, train

    corpus, run_dir, dump_path = sys.argv[1:4]

    def dump_variables(model):
        np.savez(dump_path, *[np.asarray(v.numpy()) for v in model.variables])
        return "(variables saved)"

    train(run_dir, [corpus], GPTConfig.from_preset("tiny"), TrainConfig(**TRAIN_SETTINGS),
          sample=dump_variables, verbose=False)


def _worker(corpus, run_dir, dump_path):
    return [sys.executable, "-c", "from tests.test_distributed import worker_main; worker_main()",
            corpus, run_dir, dump_path]


def _free_ports(count):
    """Ports free a moment ago. Another process may take one before a worker binds it: the
    worker then stops with "cannot listen on" (`wait_for_workers`) and `_train_two_workers`
    starts again on other ports."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _train_two_workers(corpus, run_dir, dumps, attempts=3):
    """Starts worker 0 (the chief) and worker 1 on one cluster; returns their outputs."""
    for _ in range(attempts):
        workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
        processes = []
        for index, dump in enumerate(dumps):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            processes.append(subprocess.Popen(
                _worker(corpus, run_dir, dump), cwd=REPO, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
                # A worker whose peer lost its port stops waiting soon.
                env=_env(TF_CONFIG=json.dumps(tf_config), GPT_KERAS_WORKER_TIMEOUT="60"),
            ))
        outputs = []
        try:
            for process in processes:
                outputs.append(process.communicate(timeout=TIMEOUT)[0])
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if not any("cannot listen on" in output for output in outputs):
            break
    for index, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"worker {index}:\n{output[-3000:]}"
    return outputs


@pytest.fixture(scope="module")
def single_process_run(corpus, tmp_path_factory):
    """The reference: the same training in one process with one replica."""
    directory = tmp_path_factory.mktemp("single")
    run_dir, dump = str(directory / "run"), str(directory / "variables.npz")
    _run(_worker(corpus, run_dir, dump))
    return run_dir, dump


def _load_dump(path):
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _tensorboard_event_files(run_dir):
    return glob.glob(os.path.join(run_dir, "tensorboard", "**", "events.*"), recursive=True)


def test_two_workers_match_one_process(corpus, tmp_path, single_process_run):
    reference_dir, reference_dump = single_process_run
    run_dir = str(tmp_path / "run")
    dumps = [str(tmp_path / "worker0.npz"), str(tmp_path / "worker1.npz")]
    _train_two_workers(corpus, run_dir, dumps)

    chief, worker = _load_dump(dumps[0]), _load_dump(dumps[1])
    for a, b in zip(chief, worker):  # the same all-reduced updates: bit-identical weights
        np.testing.assert_array_equal(a, b)
    _assert_close(_final_variables(run_dir), worker)  # the chief's checkpoint holds them too
    _assert_close(_load_dump(reference_dump), worker)
    _assert_same_losses(reference_dir, run_dir)
    # Only the chief wrote: the same files as one process, one TensorBoard event file per log
    # directory, one sample per sampling step.
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(reference_dir))
    assert len(_tensorboard_event_files(run_dir)) == len(_tensorboard_event_files(reference_dir))
    for directory in (run_dir, reference_dir):
        with open(os.path.join(directory, "samples.txt")) as f:
            assert f.read() == "--- step 16 ---\n(variables saved)\n"


def test_two_workers_resume_a_checkpoint(corpus, tmp_path, single_process_run):
    """The single-process run cut back to its step-8 checkpoint (as if killed after it) and
    resumed by 2 workers ends where the uninterrupted run ended."""
    reference_dir, reference_dump = single_process_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference_dir, run_dir)
    for name in ("model.keras", "tensorboard", "samples.txt",
                 os.path.join("checkpoints", "step-00000016.ckpt.npz"),
                 os.path.join("checkpoints", "best.ckpt.npz")):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    dumps = [str(tmp_path / "worker0.npz"), str(tmp_path / "worker1.npz")]
    outputs = _train_two_workers(corpus, run_dir, dumps)

    assert all("step 16:" in output and "step 8:" not in output for output in outputs)
    _assert_same_losses(reference_dir, run_dir)
    _assert_close(_load_dump(reference_dump), _load_dump(dumps[1]))
    _assert_close(_final_variables(reference_dir), _final_variables(run_dir))


# --- A worker whose peer never starts ------------------------------------------------------


@pytest.fixture
def lone_worker(corpus, tmp_path):
    """`(command, env, run_dir)` of worker 0 of a 2-worker cluster whose worker 1 never starts.
    Worker 1's port is held bound (not listening), so nothing can accept on it; worker 0 listens
    on port 0 (any free one): no port race."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    peer = f"127.0.0.1:{held.getsockname()[1]}"
    tf_config = {"cluster": {"worker": ["127.0.0.1:0", peer]},
                 "task": {"type": "worker", "index": 0}}
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "gpt_keras.cli", "train", "--data", corpus, "--run-dir",
               str(run_dir), *SMALL_MODEL_FLAGS, "--max-steps", "1"]
    yield command, _env(TF_CONFIG=json.dumps(tf_config)), run_dir, peer
    held.close()


def test_worker_whose_peer_never_starts_stops_after_the_time_out(lone_worker):
    command, env, run_dir, peer = lone_worker
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env={**env, "GPT_KERAS_WORKER_TIMEOUT": "2"},
                            capture_output=True, text=True, timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (
        f"gpt-keras: error: worker 0 waited 2 s for worker 1 ({peer}), which did not start. "
        "Start every task of TF_CONFIG with the same command, or set GPT_KERAS_WORKER_TIMEOUT "
        "to wait longer (seconds; default 300)."
    ), result.stderr[-2000:]
    assert elapsed < 2 + 60  # the time-out plus Python and TensorFlow start-up
    assert not run_dir.exists()


def test_sigterm_ends_the_wait_for_workers(lone_worker):
    command, env, run_dir, peer = lone_worker
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(TIMEOUT, process.kill)  # bounds the wait for the line below
    watchdog.start()
    try:
        for line in process.stderr:  # the wait has begun when this line is printed
            if line.startswith(f"worker 0: waiting for worker 1 ({peer}) to start (up to 300 s"):
                break
        else:
            pytest.fail(f"worker exited ({process.wait()}) without announcing the wait")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == -signal.SIGTERM
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert not run_dir.exists()


def test_worker_whose_port_is_taken_says_so(corpus, tmp_path):
    """What `_train_two_workers` retries on: a port taken between choosing and binding it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        tf_config = {"cluster": {"worker": [address, "127.0.0.1:1"]},
                     "task": {"type": "worker", "index": 0}}
        result = subprocess.run(
            [sys.executable, "-m", "gpt_keras.cli", "train", "--data", corpus, "--run-dir",
             str(tmp_path / "run"), *SMALL_MODEL_FLAGS], cwd=REPO,
            env=_env(TF_CONFIG=json.dumps(tf_config)), capture_output=True, text=True,
            timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.startswith(f"gpt-keras: error: worker 0 cannot listen on {address} "
                                    "(TF_CONFIG): Address already in use."), result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_worker_time_out_setting_is_checked(monkeypatch):
    from gpt_keras.distribute import worker_timeout

    monkeypatch.delenv("GPT_KERAS_WORKER_TIMEOUT", raising=False)
    assert worker_timeout() == 300
    monkeypatch.setenv("GPT_KERAS_WORKER_TIMEOUT", "2.5")
    assert worker_timeout() == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("GPT_KERAS_WORKER_TIMEOUT", bad)
        with pytest.raises(ValueError, match="GPT_KERAS_WORKER_TIMEOUT must be a positive "
                                             f"number of seconds. Received: '{bad}'"):
            worker_timeout()


# --- Unit checks that need no training -----------------------------------------------------


class _Resolver:
    def __init__(self, task_type, task_id, cluster):
        self.task_type, self.task_id, self.cluster = task_type, task_id, cluster

    def cluster_spec(self):
        import tensorflow as tf

        return tf.train.ClusterSpec(self.cluster)


class _Strategy:
    def __init__(self, resolver):
        self.cluster_resolver = resolver


def test_only_one_task_is_chief():
    from gpt_keras.distribute import is_chief

    workers = {"worker": ["a:1", "b:1"]}
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert is_chief(_Strategy(None))
    assert is_chief(_Strategy(_Resolver("worker", 0, workers)))
    assert not is_chief(_Strategy(_Resolver("worker", 1, workers)))
    assert is_chief(_Strategy(_Resolver("chief", 0, with_chief)))
    assert not is_chief(_Strategy(_Resolver("worker", 0, with_chief)))


def test_one_cpu_replica_uses_the_default_strategy():
    """No MirroredStrategy for one CPU device: the default strategy runs the same one-replica
    train step without its per-step cost (`make_strategy`'s docstring)."""
    import tensorflow as tf

    from gpt_keras.distribute import make_strategy

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("with GPUs, make_strategy mirrors over them")
    for replicas in (None, 1):
        strategy = make_strategy(replicas)
        assert strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy()
        assert strategy.num_replicas_in_sync == 1


def test_replicas_flag_is_refused_in_a_cluster(monkeypatch):
    from gpt_keras.distribute import cluster_workers, make_strategy

    cluster = {"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]},
               "task": {"type": "chief", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    assert cluster_workers() == 2
    with pytest.raises(ValueError, match="--replicas 2 cannot be combined with a TF_CONFIG "
                                         "cluster.*Leave out --replicas"):
        make_strategy(2)
