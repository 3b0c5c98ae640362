"""Large-N jobs that must survive failures: a process killed with SIGKILL mid-job resumes
without recomputing a finished tile, and a Dask cluster that loses a worker still finishes.

The model (``tests.models.slow_torch``) sleeps in its forward pass so that a job takes a few
seconds, long enough to interrupt; float64 kernels are compared exactly tile by tile against
an uninterrupted run (same computation, same tiles), the distributed ones to 1e-12.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zarr")

import ntkcore  # noqa: E402
from tests.models import slow_torch  # noqa: E402

pytestmark = pytest.mark.cross
REPO = Path(__file__).resolve().parents[2]


def _markers(out: Path) -> dict[str, int]:
    """The finished tiles' markers (a dot-name is one being written, or a killed writer's)."""
    done = out / "ntkcore" / "done"
    paths = [p for p in done.iterdir() if not p.name.startswith(".")] if done.exists() else []
    return {p.name: p.stat().st_mtime_ns for p in paths}


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in (out / "ntkcore" / "done").iterdir() if p.name.startswith(".")]


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the job did not get far enough in time")
        time.sleep(0.05)


def test_sigkill_then_resume(tmp_path):
    x1 = tmp_path / "x1.npy"
    np.save(x1, slow_torch.x)
    out = tmp_path / "kernel.zarr"
    command = [sys.executable, "-m", "ntkcore", "compute", "--model", "tests.models.slow_torch:model"]
    command += ["--x1", str(x1), "--out", str(out), "--batch-size", "2", "--progress", "off"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(_markers(out)) >= 5 or job.poll() is not None)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    before = _markers(out)
    total = 12 * 13 // 2  # 24 examples in tiles of 2, x2 = x1: the tiles on and above the diagonal
    assert 5 <= len(before) < total
    resumed = ntkcore.ntk(slow_torch.model, slow_torch.x, batch_size=2, out=out, progress=False)
    after = _markers(out)
    assert len(after) == total and not _leftovers(out)
    assert {k: after[k] for k in before} == before, "a finished tile was computed again"
    fresh = ntkcore.ntk(slow_torch.model, slow_torch.x, batch_size=2, out=tmp_path / "fresh.zarr", progress=False)
    np.testing.assert_array_equal(np.asarray(resumed[...]), np.asarray(fresh[...]))


def test_dask_cluster_losing_a_worker(tmp_path):
    distributed = pytest.importorskip("distributed")
    expected = ntkcore.ntk(slow_torch.model, slow_torch.x).numpy()
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        in_memory = ntkcore.ntk(slow_torch.model, slow_torch.x, batch_size=6, executor=client)
        assert isinstance(in_memory, torch.Tensor)
        np.testing.assert_allclose(in_memory.numpy(), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
        # structured derivatives capture the model's layers on the workers: the model must arrive
        # whole, not rebuilt by Dask's serialisation (which broke torch's hook registration and
        # left "auto" choosing without structured derivatives)
        structured = ntkcore.ntk(
            slow_torch.model, slow_torch.x, batch_size=6, executor=client, implementation="structured"
        )
        np.testing.assert_allclose(structured.numpy(), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())

        out = tmp_path / "kernel.zarr"
        result: dict = {}

        def job() -> None:
            try:
                result["kernel"] = ntkcore.ntk(
                    slow_torch.model, slow_torch.x, batch_size=2, out=out, executor=client, progress=False
                )
            except BaseException as error:  # reported by the main thread
                result["error"] = error

        thread = threading.Thread(target=job)
        thread.start()
        _wait_for(lambda: len(_markers(out)) >= 4 or not thread.is_alive())
        victim = sorted(client.scheduler_info()["workers"])[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        before = _markers(out)
        os.kill(pid, signal.SIGKILL)  # the worker process dies mid-job; its nanny starts another
        thread.join(timeout=300)
        assert "error" not in result, result.get("error")
        after = _markers(out)
        assert len(after) == 12 * 13 // 2
        # Dask reruns the lost worker's tasks, finished ones included: those return at once, so
        # the tiles computed after the loss are exactly the tiles that were missing
        assert {k: after[k] for k in before} == before, "a finished tile was computed again"
        np.testing.assert_allclose(
            np.asarray(result["kernel"][...]), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max()
        )
