"""TF Serving's request batching for `gpt-keras serve --enable-batching`: the same
`BatchingParameters` text file (`--batching-parameters-file`, e.g. export/batching_parameters.txt)
and the same rules as the model server's `BatchingSession`
(tensorflow_serving/batching/batching_session.cc):

- every input of a request needs a dimension 0 (its rows), the same for all inputs; a request
  with a scalar input fails with INVALID_ARGUMENT, as does one of more than `max_batch_size` rows;
- requests to the same signature of the same version are concatenated along dimension 0, up to
  `max_batch_size` rows; a batch runs when full, or `batch_timeout_micros` after its first
  request was queued, on one of `num_batch_threads` threads;
- inputs whose other dimensions differ fail the batch with FAILED_PRECONDITION, unless
  `pad_variable_length_inputs`, which pads each to the largest with its first element;
- the batch is padded to the smallest of `allowed_batch_sizes` that holds it, with copies of the
  last request's first row; outputs are split along dimension 0, and one whose dimension 0 is
  not the batch fails the batch with FAILED_PRECONDITION;
- a request that would make more than `max_enqueued_batches` full batches wait fails with
  UNAVAILABLE.

Unset fields take TF Serving's defaults. Not reproduced: `enable_large_batch_splitting` and
`max_execution_batch_size` (rejected), and the sharing of batch threads between models.
"""

import os
import threading
import time

import numpy as np
import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf import wrappers_pb2

# TF Serving's defaults for unset fields (SharedBatchScheduler::QueueOptions and ::Options).
DEFAULTS = {"max_batch_size": 1000, "batch_timeout_micros": 0, "max_enqueued_batches": 10,
            "num_batch_threads": os.cpu_count()}


def _batching_parameters_class():
    """`tensorflow.serving.BatchingParameters` as declared in TF Serving's
    tensorflow_serving/servables/tensorflow/session_bundle_config.proto (master of 2026-07-30,
    9d981c5), which the pip package tensorflow-serving-api does not ship."""
    file = descriptor_pb2.FileDescriptorProto(
        name="gpt_keras/batching_parameters.proto", package="tensorflow.serving",
        syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    message = file.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for name, number, wrapper in (
        ("max_batch_size", 1, "Int64Value"), ("batch_timeout_micros", 2, "Int64Value"),
        ("max_enqueued_batches", 3, "Int64Value"), ("num_batch_threads", 4, "Int64Value"),
        ("thread_pool_name", 5, "StringValue"), ("enable_large_batch_splitting", 8, "BoolValue"),
        ("max_execution_batch_size", 9, "Int64Value"),
    ):
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                          type_name=f".google.protobuf.{wrapper}", label=field.LABEL_OPTIONAL)
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64,
                      label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL,
                      label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


BatchingParameters = _batching_parameters_class()


def read_batching_parameters(path):
    """The `BatchingParameters` text proto in `path`; `ValueError` if it does not parse or breaks
    TF Serving's rules (allowed batch sizes increasing, the last one `max_batch_size`)."""
    try:
        with open(path, encoding="utf-8") as f:
            parameters = text_format.Parse(f.read(), BatchingParameters())
    except (OSError, text_format.ParseError) as error:
        raise ValueError(f"Cannot read the batching parameters {path}: {error}") from None
    sizes = list(parameters.allowed_batch_sizes)
    max_batch_size = (parameters.max_batch_size.value if parameters.HasField("max_batch_size")
                      else DEFAULTS["max_batch_size"])
    if sizes and (sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != max_batch_size):
        raise ValueError(f"{path}: allowed_batch_sizes {sizes} must increase and end with "
                         f"max_batch_size ({max_batch_size}), as TF Serving requires.")
    if parameters.enable_large_batch_splitting.value:
        raise ValueError(f"{path}: enable_large_batch_splitting is not supported by "
                         "`gpt-keras serve`; remove it.")
    return parameters


class _Task:
    """One request: `inputs` {name: np.ndarray with `rows` rows}, answered through `done`."""

    def __init__(self, function, inputs, rows):
        self.function = function
        self.inputs = inputs
        self.rows = rows
        self.queued = time.monotonic()
        self.done = threading.Event()
        self.outputs = self.error = None


class Batcher:
    """Merges concurrent calls of the same signature function into batched calls (see the module
    docstring); `run` is called from request threads and blocks until its rows are answered."""

    def __init__(self, parameters):
        def value(name):
            field = getattr(parameters, name)
            return field.value if parameters.HasField(name) else DEFAULTS[name]

        self.max_batch_size = value("max_batch_size")
        self.timeout = value("batch_timeout_micros") / 1e6
        self.max_enqueued_batches = value("max_enqueued_batches")
        self.allowed_batch_sizes = list(parameters.allowed_batch_sizes)
        self.pad_variable_length_inputs = parameters.pad_variable_length_inputs
        self._queues = {}  # signature function -> [_Task], in arrival order
        self._condition = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(value("num_batch_threads"))]
        for thread in self._threads:
            thread.start()

    def run(self, function, inputs):
        """`function(**inputs)` as numpy outputs, with `inputs` {name: np.ndarray} batched with
        other calls of `function`. Raises `tf.errors.OpError` as TF Serving would."""
        rows = {value.shape[0] if value.ndim else None for value in inputs.values()}
        if None in rows or not inputs:
            raise tf.errors.InvalidArgumentError(
                None, None, "Batching session Run() input tensors must have at least one "
                            "dimension")
        if len(rows) > 1:
            raise tf.errors.InvalidArgumentError(
                None, None, "Batching session Run() input tensors must have equal 0th-dimension "
                            "size")
        task = _Task(function, inputs, rows.pop())
        if task.rows > self.max_batch_size:
            raise tf.errors.InvalidArgumentError(
                None, None, f"Task size {task.rows} is larger than maximum input batch size "
                            f"{self.max_batch_size}")
        with self._condition:
            if sum(t.rows for t in self._queues.get(function, [])) + task.rows > (
                    self.max_enqueued_batches * self.max_batch_size):
                raise tf.errors.UnavailableError(
                    None, None, "The batch scheduling queue to which this task was submitted "
                                "is full")
            self._queues.setdefault(function, []).append(task)
            self._condition.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def close(self):
        """Stops the batch threads once the queued batches have run."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()

    def _work(self):
        while True:
            with self._condition:
                while not (tasks := self._take_batch()):
                    if self._closed and not self._queues:
                        return
                    self._condition.wait(self._wait_seconds())
            self._process(tasks)

    def _take_batch(self):
        """Removes and returns the tasks of a batch that is ready (full, or its first task waited
        `timeout`), oldest first; `[]` if none is. Call with the condition held."""
        now = time.monotonic()
        for function, queue in sorted(self._queues.items(), key=lambda item: item[1][0].queued):
            count, rows = 0, 0
            while count < len(queue) and rows + queue[count].rows <= self.max_batch_size:
                rows += queue[count].rows
                count += 1
            if count < len(queue) or rows == self.max_batch_size or self._closed or (
                    now - queue[0].queued >= self.timeout):
                tasks = queue[:count]
                del queue[:count]
                if not queue:
                    del self._queues[function]
                return tasks
        return []

    def _wait_seconds(self):
        """Until the oldest queued task's timeout; None (until notified) if nothing is queued."""
        if not self._queues:
            return None
        oldest = min(queue[0].queued for queue in self._queues.values())
        return max(0.0, oldest + self.timeout - time.monotonic())

    def _process(self, tasks):
        try:
            outputs = self._run_batch(tasks)
        except Exception as error:  # every request of the batch gets the batch's error
            for task in tasks:
                task.error = error
        else:
            start = 0
            for task in tasks:
                task.outputs = {name: value[start: start + task.rows]
                                for name, value in outputs.items()}
                start += task.rows
        for task in tasks:
            task.done.set()

    def _run_batch(self, tasks):
        """Merged, padded inputs → the batch's numpy outputs (padding rows included)."""
        rows = sum(task.rows for task in tasks)
        size = next((s for s in self.allowed_batch_sizes if s >= rows), rows)
        merged = {}
        for name in tasks[0].inputs:
            values = [task.inputs[name] for task in tasks]
            widths = np.max([value.shape for value in values], axis=0)[1:]
            if self.pad_variable_length_inputs:
                values = [value if value.shape[1:] == tuple(widths) else np.pad(
                    value, [(0, 0)] + [(0, w - d) for w, d in zip(widths, value.shape[1:])],
                    constant_values=value.flat[0]) for value in values]
            elif any(value.shape[1:] != values[0].shape[1:] for value in values):
                raise tf.errors.FailedPreconditionError(
                    None, None, f"Tensors with name '{name}' from different tasks have different "
                                "shapes and padding is turned off. Set pad_variable_length_inputs "
                                "to true, or ensure that all tensors with the same name have "
                                "equal dimensions starting with the first dim.")
            values += [values[-1][:1]] * (size - rows)
            merged[name] = np.concatenate(values)
        outputs = {name: value.numpy() for name, value in tasks[0].function(
            **{name: tf.constant(value) for name, value in merged.items()}).items()}
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != size:
                raise tf.errors.FailedPreconditionError(
                    None, None, f"Batched output tensor '{name}' has shape {list(value.shape)}; "
                                f"its 0th dimension should be the batch size {size}")
        return outputs
