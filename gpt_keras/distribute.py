"""Choosing the `tf.distribute` strategy that a training run always runs under."""

import json
import os

import tensorflow as tf


def cluster_workers():
    """Number of workers that `TF_CONFIG` describes (0 when it describes no cluster)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    return len(config.get("cluster", {}).get("worker", []))


def make_strategy(replicas=None):
    """`MultiWorkerMirroredStrategy` when `TF_CONFIG` describes 2+ workers; otherwise
    `MirroredStrategy` over all local GPUs (the first `replicas` if given) or, without GPUs, over
    `replicas` logical CPU devices (1 by default). Splitting the CPU must happen before TensorFlow
    runs any op, so call this first."""
    if cluster_workers() > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas must be at least 1. Received: {replicas}")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if replicas and replicas > len(gpus):
            raise ValueError(f"--replicas {replicas} asks for more GPUs than the {len(gpus)} found.")
        devices = [d.name for d in tf.config.list_logical_devices("GPU")][: replicas or None]
        return tf.distribute.MirroredStrategy(devices)
    cpu = tf.config.list_physical_devices("CPU")[0]
    replicas = replicas or 1
    if replicas > 1:
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
