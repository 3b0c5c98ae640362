"""One benchmark process: time one runner on one or more workloads and print a JSON line each.

    python -m benchmarks.child '{"runner": ..., "backend": ..., "implementation": ..., ...}'

Runners: ``ntkcore`` (a backend × implementation), ``torch.func`` (the plain baseline),
``neural-tangents`` (run by the anchor environment's python), ``reference`` (ntkcore in
float64, the kernel every other result is checked against) and ``matmul`` (this machine's
float32 matmul throughput in one framework). Each kernel is saved as .npy for the parent to
check; times are medians of ``repeats`` calls after a first (compiling) call, and memory is
the peak above the level reached once the model and inputs were built (RSS on CPU, the
framework allocator's peak on a GPU). Imports stay lazy: the neural-tangents environment has
only numpy, jax and neural-tangents.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workloads import ALL, Workload, build, load


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_peak_mb(backend: str) -> float | None:
    """The framework allocator's peak on a GPU, or None when running on the CPU."""
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return device.memory_stats()["peak_bytes_in_use"] / 2**20 if device.platform == "gpu" else None
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        return None
    return None


def _device(backend: str) -> str:
    if backend == "torch":
        import torch

        return f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    if backend == "jax":
        import jax

        return f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return f"gpu ({gpus[0].name})" if gpus else "cpu"
    return "cpu"


def time_calls(call: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float, list[float]]:
    """(first result, first-call seconds, seconds of each further call); ``call`` returns host data.

    Like ``ntkcore.demo.time_calls``, but importable in the neural-tangents environment,
    which cannot import ntkcore, and keeping every time.
    """
    start = time.perf_counter()
    result = call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return result, first, times


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _to_framework(backend: str, x: np.ndarray) -> Any:
    if backend == "torch":
        import torch

        return torch.as_tensor(x, device=_torch_device())
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.constant(x)
    return x


def _kernel_call(spec: dict, workload: Workload, arrays: dict, x: np.ndarray) -> Callable[[], np.ndarray]:
    runner, backend, implementation = spec["runner"], spec.get("backend"), spec.get("implementation")
    if runner == "neural-tangents":
        from benchmarks.neural_tangents_anchor import kernel_fn

        fn = kernel_fn(workload, arrays, implementation)
        return lambda: fn(x)
    if runner == "torch.func":
        from benchmarks.torchfunc_baseline import kernel_fn

        model, _ = build("torch", workload, arrays)
        fn = kernel_fn(model.to(_torch_device()), implementation, workload.traced)
        xt = _to_framework("torch", x)
        return lambda: fn(xt).cpu().numpy()
    import ntkcore

    dtype = "float32"
    if runner == "reference":  # ntkcore in float64: structured derivatives, exact and cheap
        dtype, implementation = "float64", "structured"
        if backend == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)
        x = x.astype(np.float64) if x.dtype.kind == "f" else x
    model, kwargs = build(backend, workload, arrays, dtype)
    if backend == "torch":
        model = model.to(_torch_device())
    fn = ntkcore.ntk_fn(model, implementation=implementation, **workload.axes, **kwargs)
    adapter, xf = ntkcore.get_backend(backend), _to_framework(backend, x)
    return lambda: np.asarray(adapter.to_numpy(fn(xf)), np.float64 if runner == "reference" else None)


def _matmul(backend: str, repeats: int, n: int = 2048) -> dict:
    """float32 (n × n) @ (n × n) in ``backend``'s framework: FLOP/s, best of ``repeats``."""
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    if backend == "numpy":
        call = lambda: a @ a  # noqa: E731
    elif backend == "torch":
        t = _to_framework("torch", a)
        call = lambda: (t @ t).cpu().numpy()  # noqa: E731
    elif backend == "jax":
        import jax

        t, mm = _to_framework("jax", a), jax.jit(lambda u: u @ u)
        call = lambda: np.asarray(mm(t))  # noqa: E731
    else:
        import tensorflow as tf

        t = _to_framework("tensorflow", a)
        mm = tf.function(lambda u: tf.matmul(u, u))
        call = lambda: mm(t).numpy()  # noqa: E731
    _, _, times = time_calls(call, repeats)
    return {"runner": "matmul", "backend": backend, "flops_per_s": 2 * n**3 / min(times), "device": _device(backend)}


def run(spec: dict) -> None:
    if spec["runner"] == "matmul":
        print(json.dumps(_matmul(spec["backend"], spec["repeats"])), flush=True)
        return
    for name in spec["workloads"]:
        workload = ALL[name]
        arrays, x = load(Path(spec["data"]) / f"{name}.npz")
        call = _kernel_call(spec, workload, arrays, x)
        baseline = _rss_mb()
        kernel, first, times = time_calls(call, spec["repeats"])
        gpu = _gpu_peak_mb(spec["backend"])
        result = {
            "runner": spec["runner"],
            "backend": spec["backend"],
            "implementation": spec.get("implementation"),
            "workload": name,
            "device": _device(spec["backend"]),
            "first_s": first,
            "median_s": statistics.median(times) if times else first,
            "times_s": times,
            "peak_mb": gpu if gpu is not None else _rss_mb() - baseline,
            "memory": "gpu allocator peak" if gpu is not None else "rss above baseline",
        }
        np.save(Path(spec["save"]) / kernel_file(spec, name), kernel)
        print(json.dumps(result), flush=True)
        if result["median_s"] > spec.get("budget_s", float("inf")):
            return  # the next (larger) point of a sweep would take too long


def kernel_file(spec: dict, workload: str) -> str:
    """The .npy name a runner's kernel of ``workload`` is saved under (read back by the harness)."""
    label = "-".join(str(spec.get(k)) for k in ("runner", "backend", "implementation")).replace(".", "")
    return f"{label}-{workload}.npy"


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
