"""The `tf.distribute` strategy a training run always runs under, and the train/test steps that
make `model.fit` exact under it: one device, N local devices, or several workers.

Multi-worker training is `model.fit` with our own `train_step`/`test_step`, not a separate loop:

- `make_strategy` picks `MultiWorkerMirroredStrategy` when `TF_CONFIG` describes a cluster of
  2+ tasks (after `wait_for_workers`, bounded by `$GPT_KERAS_WORKER_TIMEOUT`), else
  `MirroredStrategy` over the local GPUs or over N ≥ 2 logical CPU devices, and TensorFlow's
  default strategy for one CPU replica.
- `GlobalBatchSteps` (mixed into the trained `GPT`: `TrainingGPT`) computes the loss itself.
  Each replica takes the gradient of its slice of the global batch, then one all-reduce over
  every replica of every worker gives all of them the global-batch gradient and loss *before*
  `optimizer.apply`, so global-norm clipping and the loss-scale check see the whole batch (Keras
  3.15 all-reduces inside the optimizer, after clipping: 2 replicas clipped at the wrong norm).
  Gradient accumulation happens in the model too: the optimizer's own fails with 2+ replicas.
- Keras 3.15's `fit` fails under `MultiWorkerMirroredStrategy` in two places, worked around
  here: it reduces the first batch with `strategy.reduce`, which takes no `(inputs, targets)`
  tuple there (`Attempt to convert a value (PerReplica...)`, keras #20585) — `stack_pairs` makes
  each batch one tensor; and it reduces every step's logs with `strategy.reduce(..., axis=0)`,
  which fails for a scalar — `GlobalBatchSteps` logs the loss (equal on all replicas) with a
  batch axis of 1 there.

The global batch is split over all replicas, so without dropout a run gives the same losses and
weights (up to float rounding) with any number of replicas or workers; with dropout each replica
draws the masks of its own slice, so the losses depend on the replica count. Every worker builds
the same global batches from `(seed, step)` and keeps its own slice (`data.training_dataset`).
Only the chief (`is_chief`) writes into the run directory; the other workers read the tokenizer,
token file and checkpoints that the chief wrote there, so the run directory must be on a file
system that every worker can read (on one machine it is).
"""

import json
import os
import socket
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from gpt_keras.model import GPT

WORKER_TIMEOUT_VARIABLE = "GPT_KERAS_WORKER_TIMEOUT"
DEFAULT_WORKER_TIMEOUT = 300.0  # seconds a worker waits for the others to start
_POLL_INTERVAL = 0.2  # seconds between connection attempts to the workers not yet up


def _tf_config():
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def cluster_workers():
    """Number of tasks (chief and workers) that `TF_CONFIG` describes (0 when no cluster)."""
    cluster = _tf_config().get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def make_strategy(replicas=None):
    """`MultiWorkerMirroredStrategy` when `TF_CONFIG` describes 2+ tasks; otherwise
    `MirroredStrategy` over all local GPUs (the first `replicas` if given) or, without GPUs, over
    `replicas` logical CPU devices. Splitting the CPU must happen before TensorFlow runs any op,
    so call this first.

    One CPU replica (the default without GPUs) gets TensorFlow's default strategy: the same
    train step (one replica in sync), without the per-step cost of a one-device
    `MirroredStrategy` (or `OneDeviceStrategy`): 31 vs 22 ms per `shakespeare-char` step with
    XLA, 40 vs 31 ms without, on a 2-core CPU (its distributed input iterator and replica
    wrapping; measured in separate processes)."""
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas must be at least 1. Received: {replicas}")
    if cluster_workers() > 1:
        if replicas not in (None, 1):
            raise ValueError(
                f"--replicas {replicas} cannot be combined with a TF_CONFIG cluster: each worker "
                "uses all of its GPUs (or its CPU). Leave out --replicas, or unset TF_CONFIG."
            )
        wait_for_workers()
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if replicas and replicas > len(gpus):
            raise ValueError(f"--replicas {replicas} asks for more GPUs than the {len(gpus)} found.")
        devices = [d.name for d in tf.config.list_logical_devices("GPU")][: replicas or None]
        return tf.distribute.MirroredStrategy(devices)
    cpu = tf.config.list_physical_devices("CPU")[0]
    replicas = replicas or 1
    if replicas == 1:
        return tf.distribute.get_strategy()  # the default strategy (see above)
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError:
        pass  # already initialised; checked below
    found = len(tf.config.list_logical_devices("CPU"))
    if found != replicas:
        raise ValueError(
            f"--replicas {replicas}: TensorFlow was initialised with {found} CPU device(s) "
            "before the CPU could be split. Ask for replicas before any TensorFlow op runs."
        )
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])


def worker_timeout():
    """Seconds `wait_for_workers` waits: `$GPT_KERAS_WORKER_TIMEOUT`, default 300."""
    text = os.environ.get(WORKER_TIMEOUT_VARIABLE, "")
    if not text:
        return DEFAULT_WORKER_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{WORKER_TIMEOUT_VARIABLE} must be a positive number of seconds. "
                         f"Received: {text!r}")
    return value


def _address(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def wait_for_workers(timeout=None):
    """Returns once every other task of the `TF_CONFIG` cluster accepts connections on its
    address; this task listens on its own address meanwhile (`timeout`: `worker_timeout()`).

    Why: `MultiWorkerMirroredStrategy()` waits for missing peers without a limit, holding the
    GIL in TensorFlow's C++ code, with a SIGTERM handler of its own installed (TF 2.21 ignores
    SIGTERM there). This wait is plain Python before it: SIGTERM ends the process as usual (nothing
    is written before the strategy exists). A peer seen here starts TensorFlow's server on the
    same port right after closing its listener, so every task sees every other one.

    Raises `ValueError` naming the tasks that did not come up within `timeout` seconds and the
    setting, and when this task's port is taken by another process.
    """
    timeout = worker_timeout() if timeout is None else timeout
    config = _tf_config()
    task = config.get("task") or {}
    me = (task.get("type"), int(task.get("index", 0)))
    tasks = {(kind, index): address for kind in ("chief", "worker")
             for index, address in enumerate(config.get("cluster", {}).get(kind, []))}
    if me not in tasks:
        return  # not a chief/worker of the cluster: TensorFlow's own check reports it
    name = f"{me[0]} {me[1]}"
    listener = socket.socket(socket.AF_INET6 if ":" in _address(tasks[me])[0] else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", _address(tasks[me])[1]))
        listener.listen(len(tasks))
    except OSError as error:
        listener.close()
        raise ValueError(f"{name} cannot listen on {tasks[me]} (TF_CONFIG): {error.strerror}. "
                         "Another process uses that port: stop it or give this worker another "
                         "port in TF_CONFIG.") from None
    waiting = {peer: address for peer, address in tasks.items() if peer != me}
    deadline = time.monotonic() + timeout
    announced = False
    try:
        while True:
            for peer, address in list(waiting.items()):
                try:
                    socket.create_connection(_address(address), timeout=1.0).close()
                    del waiting[peer]
                except OSError:
                    pass
            if not waiting:
                return
            missing = ", ".join(f"{kind} {index} ({address})"
                                for (kind, index), address in sorted(waiting.items()))
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"{name} waited {timeout:g} s for {missing}, which did not start. Start "
                    f"every task of TF_CONFIG with the same command, or set "
                    f"{WORKER_TIMEOUT_VARIABLE} to wait longer (seconds; default "
                    f"{DEFAULT_WORKER_TIMEOUT:g})."
                )
            if not announced:
                print(f"{name}: waiting for {missing} to start (up to {timeout:g} s, "
                      f"{WORKER_TIMEOUT_VARIABLE}).", file=sys.stderr, flush=True)
                announced = True
            time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
    finally:
        listener.close()


def is_chief(strategy):
    """True for the one process that writes files: the only process without a cluster, else the
    `chief` task, or worker 0 when the cluster has no `chief` task."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        cluster_workers() > 1
    )


def worker_name(strategy):
    """`worker 1`-style name of this process, for messages."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "this process"
    return f"{resolver.task_type} {resolver.task_id}"


def gather_from_replicas(strategy, values):
    """Every replica's copy of the integers `values`, as an int64 array `[replicas, len(values)]`.

    A collective op under `MultiWorkerMirroredStrategy`: every worker must call it at the same
    point, and it returns only when all have (so it doubles as a barrier). Raises `ValueError`
    when another worker stopped instead (its own output says why).
    """
    local = np.asarray([values], np.int64)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(local)
    )
    try:
        return np.asarray(strategy.gather(per_replica, axis=0))
    except tf.errors.OpError as error:
        raise ValueError(
            f"{worker_name(strategy)} lost the other workers ({type(error).__name__}): one of "
            "them stopped; its output says why."
        ) from None


def barrier(strategy):
    """Returns once every worker has called it (no-op without a multi-worker cluster)."""
    if is_multi_worker(strategy):
        gather_from_replicas(strategy, [0])


def check_same_on_workers(strategy, what, value):
    """Raises `ValueError` on every worker unless all workers hold the same integer `value`
    (no-op without a multi-worker cluster)."""
    if not is_multi_worker(strategy):
        return
    found = gather_from_replicas(strategy, [value])[:, 0]
    if len(set(found.tolist())) > 1:
        raise ValueError(
            f"The workers see different {what}: {', '.join(map(str, found.tolist()))} (one per "
            "replica). Put --run-dir on a file system that every worker reads, and start every "
            "worker with the same command."
        )


def stack_pairs(dataset):
    """`(inputs, targets)` batches `[B, T]` → one int32 tensor `[B, 2, T]` per batch (see the
    module docstring for why; `GlobalBatchSteps` unstacks it). `(inputs, targets, weights)`
    batches (float32 per-token loss weights, `gpt_keras.sft`) → `[B, 3, T]`, the weights bit-cast
    to int32 (exact: `GlobalBatchSteps` bit-casts them back).

    tf.data's autotuning is turned off (AUTOTUNE parallelism then means one call per core, which
    autotuning picks for these pipelines anyway): in TF 2.21 deleting an iterator waits for the
    rest of its autotuning thread's sleep, which doubles up to a minute, so `fit` often returned
    late (measured: 1.7-1.8 s after a 5 s fit, 1.7-3 s after a 20 s one)."""

    def stack(inputs, targets, weights=None):
        parts = [inputs, targets] if weights is None else [inputs, targets,
                                                           tf.bitcast(weights, tf.int32)]
        return tf.stack(parts, axis=1)

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.map(stack).with_options(options)


def _skip_optimizer_all_reduce(optimizer):
    """Works around Keras 3.15's TensorFlow optimizer summing gradients over replicas inside
    `apply`, *after* global-norm clipping and the loss-scale finiteness check have seen each
    replica's partial gradient (so 2 replicas clip at the wrong norm, and replicas can disagree
    on finiteness). `GlobalBatchSteps.train_step` all-reduces before `apply`; this makes the
    optimizer's own all-reduce (`_all_reduce_sum_gradients`) a no-op, or it would sum again."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer wraps one
    if not callable(getattr(inner, "_all_reduce_sum_gradients", None)):
        raise RuntimeError(
            f"This Keras version ({keras.__version__}) changed how its optimizer all-reduces "
            "gradients; gpt_keras.distribute._skip_optimizer_all_reduce needs updating."
        )
    inner._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)


class GlobalBatchSteps:
    """Mixin for a Keras language model (before the model class in the bases): `train_step` and
    `test_step` that reduce across all replicas themselves, so `fit` is exact under
    `MirroredStrategy` and `MultiWorkerMirroredStrategy` alike.

    Batches are `(inputs, targets)` int `[B, T]` pairs or the `[B, 2, T]` tensors of
    `stack_pairs`; the loss is the mean token cross-entropy of the global batch (logits from
    `self(inputs)`). A batch may carry float per-token loss weights `[B, T]` as a third element
    (`(inputs, targets, weights)`, or the `[B, 3, T]` of `stack_pairs`): each replica's loss is
    then `mean(weights * token_loss)` over its slice (Keras' sum-over-batch-size reduction), so the
    weights decide the normalisation (`gpt_keras.sft` scales them so that the update's loss is
    `sum(w * loss) / sum(w)` over the global batch). Compile with an optimizer and no loss: the loss is computed here, and the one
    metric, `loss`, is the running mean over the steps since the last reset (a Keras epoch),
    identical on every replica.

    `compile(optimizer, gradient_accumulation_steps=k)` accumulates here, not in the optimizer
    (whose own accumulation fails with 2+ replicas in Keras 3.15: a `merge_call` inside a
    replica-context `cond`): every `fit` step is a micro-batch, and every k-th applies the mean
    of the last k global-batch gradients, so `optimizer.iterations` counts updates.

    `compile(optimizer, jit_compile=True)` (the default) compiles training with XLA: with one
    replica, the whole step (Keras' `jit_compile`); with several replicas or workers, each
    replica's forward and backward pass, while the all-reduce and the update run as plain
    TensorFlow ops (see `compile`). `jit_compile=False` runs plain TensorFlow graphs. Dropout
    masks differ between the two (XLA has its own random-number kernels), so a run resumes
    exactly only in the mode it started in.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def compile(self, optimizer, gradient_accumulation_steps=1, jit_compile=True, **kwargs):
        if kwargs.get("loss") is not None:
            raise ValueError(
                f"{type(self).__name__} computes its own loss; compile it with an optimizer only."
            )
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise ValueError(
                f"Pass gradient_accumulation_steps to {type(self).__name__}.compile, not to the "
                "optimizer (its accumulation fails with more than one replica)."
            )
        if jit_compile not in (True, False):
            raise ValueError(f"jit_compile must be True or False. Received: {jit_compile!r}")
        # XLA: Keras compiles the whole step (forward, backward, update) with one replica only.
        # Its XLA function holds every replica's step, and XLA cannot reach the variables of
        # another device ("Trying to access resource ... located in device CPU:1 from device
        # CPU:0"), so with 2+ replicas each replica's forward and backward pass is compiled on
        # its own (`_loss_and_gradients`) and the all-reduce and update run outside XLA.
        whole_step = jit_compile and self.distribute_strategy.num_replicas_in_sync == 1
        super().compile(optimizer=optimizer, jit_compile=whole_step, **kwargs)
        self._compiled_gradients = None
        if jit_compile and not whole_step:
            self._compiled_gradients = tf.function(self._loss_and_gradients, jit_compile=True)
        _skip_optimizer_all_reduce(self.optimizer)
        # Built now, eagerly: an optimizer built inside the first traced step creates variables
        # there, and `tf.function` then traces the whole step a second time.
        self.optimizer.build(self.trainable_variables)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._accumulators = None
        if gradient_accumulation_steps > 1:
            # Plain `tf.Variable`s, not Keras weights: outside `model.variables` (checkpoints
            # are written at update boundaries, where the accumulators are zero).
            self._accumulators = [
                tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                            name=v.path.replace("/", "_") + "_accumulator")
                for v in self.trainable_variables
            ]
            self._micro_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="micro_step")

    @staticmethod
    def _unpack(data):
        """`(inputs, targets, weights)`; `weights` is None for unweighted batches."""
        if isinstance(data, (tuple, list)):
            return data[0], data[1], data[2] if len(data) > 2 else None
        # Stacked by `stack_pairs`: [B, 2, T], or [B, 3, T] with bit-cast weights.
        weights = tf.bitcast(data[:, 2], tf.float32) if data.shape[1] == 3 else None
        return data[:, 0], data[:, 1], weights

    def _token_loss(self, targets, logits, weights=None):
        """Mean cross-entropy over this replica's tokens (float32), each token's multiplied by
        its weight if `weights` `[B, T]` are given."""
        losses = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        losses = keras.ops.cast(losses, "float32")
        if weights is not None:
            losses = losses * keras.ops.cast(weights, "float32")
        return keras.ops.mean(losses)

    def _loss_and_gradients(self, inputs, targets, weights=None):
        """This replica's mean token loss and the gradients of the (scaled) loss."""
        with tf.GradientTape() as tape:
            logits = self(inputs, training=True)
            loss = self._token_loss(targets, logits, weights)
            scaled_loss = self.optimizer.scale_loss(loss)  # loss scaling under mixed_float16
        return loss, tape.gradient(scaled_loss, self.trainable_variables)

    def train_step(self, data):
        inputs, targets, weights = self._unpack(data)
        loss_and_gradients = self._compiled_gradients or self._loss_and_gradients
        loss, gradients = loss_and_gradients(inputs, targets, weights)
        # Equal slices per replica: the mean of the replicas' gradients (and losses) is the
        # gradient (and loss) of the global batch. One all-reduce over all workers.
        replica = tf.distribute.get_replica_context()
        if replica.num_replicas_in_sync > 1:
            loss, *gradients = replica.all_reduce(tf.distribute.ReduceOp.MEAN, [loss, *gradients])
        if self._accumulators is None:
            self.optimizer.apply(gradients, self.trainable_variables)
        else:
            replica.merge_call(self._accumulate_or_apply, args=(gradients,))
        self.loss_tracker.update_state(loss)
        return self._step_logs()

    def _accumulate_or_apply(self, strategy, gradients):
        """Cross-replica half of an accumulating `train_step`: adds the (all-reduced, so
        identical) `gradients` to the accumulators, or on every k-th call applies their mean.
        The `cond` sits in cross-replica context because the optimizer's update `merge_call`s
        (Keras' LossScaleOptimizer does the same)."""
        steps = self.gradient_accumulation_steps
        update = strategy.extended.update

        def apply():
            def apply_mean(gradients):
                mean = [(accumulator + gradient) / steps
                        for accumulator, gradient in zip(self._accumulators, gradients)]
                self.optimizer.apply(mean, self.trainable_variables)

            strategy.extended.call_for_each_replica(apply_mean, args=(gradients,))
            for accumulator in self._accumulators:
                update(accumulator, lambda v: v.assign(tf.zeros_like(v)), group=False)

        def accumulate():
            for accumulator, gradient in zip(self._accumulators, gradients):
                update(accumulator, lambda v, g: v.assign_add(g), args=(gradient,), group=False)

        tf.cond(tf.equal((self._micro_step + 1) % steps, 0), apply, accumulate)
        update(self._micro_step, lambda v: v.assign_add(1), group=False)

    def test_step(self, data):
        inputs, targets, weights = self._unpack(data)
        loss = self._token_loss(targets, self(inputs, training=False), weights)
        replica = tf.distribute.get_replica_context()
        if replica.num_replicas_in_sync > 1:
            loss = replica.all_reduce(tf.distribute.ReduceOp.MEAN, loss)
        self.loss_tracker.update_state(loss)
        return self._step_logs()

    def _step_logs(self):
        """The step's logs, equal on every replica. Works around Keras 3.15 reducing step logs
        with `strategy.reduce("MEAN", value, axis=0)` under `MultiWorkerMirroredStrategy`, which
        fails for a scalar: there the loss gets a batch axis of 1, which that reduce removes."""
        loss = self.loss_tracker.result()
        if is_multi_worker(self.distribute_strategy):
            loss = keras.ops.reshape(loss, (1,))
        return {"loss": loss}


class TrainingGPT(GlobalBatchSteps, GPT):
    """The `GPT` that `gpt_keras.training` trains: same weights and forward pass, with the
    train/test steps of `GlobalBatchSteps`. Saved models are plain `GPT`s."""
