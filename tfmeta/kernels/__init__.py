"""tfmeta's own CPU kernels, compiled at first use against the installed TensorFlow.

`conv_block.cc` fuses conv_net's first block (`tfmeta.kernels.conv_block`); `norm_pool.cc` runs the later blocks'
batch norm, ReLU and pooling forward, backward, and that backward pass's gradient (`tfmeta.kernels.norm_pool`);
`batch_matmul.cc` multiplies the small per-task matrices of dense learners under `tf.vectorized_map`
(`tfmeta.kernels.batch_matmul`). They are built once per machine with g++ and TensorFlow's headers (`tf.sysconfig`,
about 40 s on two cores) into one library in `$TFMETA_KERNEL_CACHE` (default `~/.cache/tfmeta/kernels`), keyed by
the sources, TensorFlow's version and the CPU (it is compiled for the machine's own instruction set). Where no
compiler is present or the build fails, `load()` warns once and returns None, and tfmeta runs TensorFlow's own ops
instead: the kernels change speed, never results beyond float rounding. `TFMETA_FUSED_KERNELS=0` turns them off;
`disabled()` does so while a block of code traces (SavedModel exports use it, so that a served model needs no tfmeta
kernels).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from typing import Iterator, Optional

import tensorflow as tf

SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
           for name in ("conv_block.cc", "norm_pool.cc", "batch_matmul.cc")]
_lock = threading.Lock()
_state = threading.local()
_library = None
_failed = False


def _cpu() -> str:
    """The CPU's model name and instruction-set flags, which `-march=native` compiles for."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _flags() -> list[str]:
    """g++'s flags for one source file."""
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "-march=native", "-fPIC", "-w"]
    if "avx512_fp16" in _cpu() or "avx512fp16" in _cpu():
        flags.append("-mno-avx512fp16")  # Eigen's AVX512-FP16 code in TensorFlow's headers does not build with g++
    return flags + tf.sysconfig.get_compile_flags()


def library_path() -> str:
    """Where the compiled kernels are (or will be) for these sources, TensorFlow and CPU."""
    sources = []
    for source in SOURCES:
        with open(source, "rb") as f:
            sources.append(f.read())
    key = hashlib.sha256(b"".join(sources) + tf.__version__.encode() + _cpu().encode()
                         + " ".join(_flags()).encode()).hexdigest()[:16]
    cache = os.environ.get("TFMETA_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tfmeta",
                                                                  "kernels")
    return os.path.join(cache, key, "conv_block.so")


def _build(target: str) -> None:
    """Compiles the kernels into `target`, once across processes (a file lock; the tests run two workers)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(target):
            return
        with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as scratch:
            objects = [os.path.join(scratch, os.path.basename(source) + ".o") for source in SOURCES]
            compiles = [subprocess.Popen(["g++", *_flags(), "-c", source, "-o", obj], stderr=subprocess.PIPE, text=True)
                        for source, obj in zip(SOURCES, objects)]  # in parallel: each parses TensorFlow's headers
            errors = [(job.communicate()[1], job.returncode) for job in compiles]
            partial = os.path.join(scratch, "conv_block.so")
            link = subprocess.run(["g++", "-shared", *objects, "-o", partial, *tf.sysconfig.get_link_flags()],
                                  capture_output=True, text=True)
            errors.append((link.stderr, link.returncode))
            for stderr, code in errors:
                if code != 0:
                    raise RuntimeError(stderr.strip()[-2000:] or f"g++ exited with {code}")
            os.replace(partial, target)


def load():
    """The kernels' op module (`tf.load_op_library`), built at the first call; None where they are off or cannot be
    built (with a warning naming the cause, once)."""
    global _library, _failed
    if os.environ.get("TFMETA_FUSED_KERNELS", "1") == "0":
        return None
    with _lock:
        if _library is None and not _failed:
            target = library_path()
            try:
                if not os.path.exists(target):
                    _build(target)
                _library = tf.load_op_library(target)
            except (OSError, RuntimeError, tf.errors.OpError) as error:
                _failed = True
                warnings.warn(f"tfmeta could not build its fused CPU kernels, and runs TensorFlow's ops instead "
                              f"(slower, same results): {error}", RuntimeWarning, stacklevel=2)
    return _library


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Traces the code inside without tfmeta's kernels (e.g. a SavedModel that must load without tfmeta)."""
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


def usable() -> Optional[object]:
    """The op module if tfmeta's kernels may run in the code being traced now: not under `disabled()`, not inside
    an XLA compilation (they have no XLA kernel), and on a machine without GPUs (they have no GPU kernel)."""
    from tensorflow.python.ops import control_flow_util

    if getattr(_state, "disabled", False) or tf.config.list_logical_devices("GPU"):
        return None
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return None
    return load()
