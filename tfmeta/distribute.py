"""`tf.distribute` for meta-training: the strategy of a run, the per-replica arithmetic meta-learners need, and the
CPU thread pools.

Under a strategy, `fit` splits every meta-batch of tasks across the replicas (the dataset yields global
meta-batches; each replica gets its contiguous share, so the episodes are those of a single-device run).
Each replica averages the meta-gradients of its tasks; Keras' optimizer sums the replicas' gradients, so the
meta-learners divide by the number of replicas (`replica_mean`); statistics such as BatchNorm's moving
averages are all-reduced (mean) before they are assigned; per-task seeds fold in the task's global index.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import tensorflow as tf

from tfmeta.checks import integer

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
_cache: dict = {}


def set_thread_pools(intra_op: int = 0, inter_op: int = 0) -> None:
    """Sets TensorFlow's CPU thread pools; 0 keeps TensorFlow's choice (one thread per core in each pool).

    Run it before TensorFlow runs any op: TensorFlow fixes its pools then. On CPU, a meta-batch of several tasks
    of a conv learner runs fastest with `intra_op=1`: each op runs on one thread, and `tf.map_fn` runs as many
    tasks at once as the inter-op pool has threads. Measured on 2 cores (docs/performance.md), this makes the
    conv4 MAML steps 5-25% shorter. With one task per meta-step (metric learners' single episodes) no tasks
    run concurrently: measure before using it there."""
    threading = tf.config.threading
    for name, value, setter in (("intra_op", intra_op, threading.set_intra_op_parallelism_threads),
                                ("inter_op", inter_op, threading.set_inter_op_parallelism_threads)):
        if integer(value, name, minimum=0, owner="set_thread_pools"):
            try:
                setter(value)  # a no-op when TensorFlow already has this value
            except RuntimeError as error:
                raise RuntimeError(
                    f"set_thread_pools: cannot set `{name}` to {value}: TensorFlow has already run an op, and its "
                    f"thread pools are fixed then. Call it first thing in the process (the tools do).") from error


def make_strategy(name: Optional[str] = "default", tpu: Optional[str] = None, devices: Optional[Sequence[str]] = None
                  ) -> tf.distribute.Strategy:
    """The run's strategy (created once per process; create it before any other TensorFlow op, as
    `tools/train.py` does, since multi-worker and TPU strategies configure the runtime).

    Args:
      name: "default" or None (no strategy), "one_device", "mirrored" (all local GPUs, or the CPU),
        "multi_worker_mirrored" (workers from the TF_CONFIG environment variable) or "tpu".
      tpu: the TPU's name or grpc:// address for "tpu" (default: TPU_NAME, or the local TPU).
      devices: the devices of "mirrored" (default: all local GPUs, else the CPU) or the one of "one_device"
        (default: the first GPU, else the CPU).
    """
    name = name or "default"
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}.")
    key = (name, tpu, tuple(devices or ()))
    if key in _cache:
        return _cache[key]
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.OneDeviceStrategy(devices[0] if devices else gpus[0].name if gpus else "/cpu:0")
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(list(devices) if devices else None)
    elif name == "multi_worker_mirrored":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("the multi_worker_mirrored strategy reads its cluster from the TF_CONFIG environment "
                             "variable, which is not set (see BUILD.md).")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or os.environ.get("TPU_NAME", ""))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    _cache[key] = strategy
    return strategy


def worker(strategy: tf.distribute.Strategy) -> tuple[str, int]:
    """(task type, index) of this process in `strategy`'s cluster (from TF_CONFIG); ("worker", 0) alone."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "worker", 0
    return resolver.task_type, int(resolver.task_id)


def multi_worker(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """Whether `strategy` (default: the current one) spans several workers."""
    extended = (strategy or tf.distribute.get_strategy()).extended
    return bool(getattr(extended, "_in_multi_worker_mode", lambda: False)())


def replicas() -> tuple[int, tf.Tensor]:
    """(replicas in sync, this replica's index) in the current replica context; (1, 0) outside one."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 1, tf.constant(0)
    return context.num_replicas_in_sync, tf.convert_to_tensor(context.replica_id_in_sync_group)


def replica_mean(grads: list) -> list:
    """Gradients to hand to the optimizer so that its sum over replicas is their mean."""
    count, _ = replicas()
    return grads if count == 1 else [g / count for g in grads]


def all_reduce_mean(values: list) -> list:
    """The mean of floating-point `values` over the replicas (other values as they are)."""
    count, _ = replicas()
    if count == 1:
        return values
    floating = [i for i, v in enumerate(values) if v.dtype.is_floating]
    if not floating:
        return values
    # One batched all-reduce inside a merge call, as Keras' optimizer reduces gradients: merge calls run in the
    # same order on every replica, whereas replicas may issue separate collectives in different orders.
    def merge(strategy, tensors):
        return strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.MEAN, [(t, t) for t in tensors])

    reduced = tf.distribute.get_replica_context().merge_call(merge, args=([values[i] for i in floating],))
    values = list(values)
    for i, value in zip(floating, reduced):
        values[i] = value
    return values
