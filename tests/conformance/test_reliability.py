"""Nothing silently wrong, nothing crashes: ntkcore's own checks on inputs, models, stores and
the analysis tools, on every backend. Each test is one case class of the reliability audit."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import ntkcore
from ntkcore.implementations import AUTO, REGISTRY
from tests.models.spec import inputs

IMPLEMENTATIONS = (*REGISTRY, AUTO)
REPO = Path(__file__).resolve().parents[2]


def _mlp(zoo):
    built = zoo.build("mlp", "float64")
    x1, x2 = inputs("mlp")
    return built, x1, x2


# -- inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_are_refused(backend, zoo, bad):
    built, x1, _ = _mlp(zoo)
    poisoned = x1.copy()
    poisoned[2, 3] = bad
    with pytest.raises(ValueError, match=r"x1 has a non-finite entry .* at index \(2, 3\)"):
        ntkcore.ntk(built.model, zoo.to_native(poisoned, "float64"), **built.kwargs)
    with pytest.raises(ValueError, match=r"x2 has a non-finite entry"):
        ntkcore.ntk(built.model, x1, poisoned, **built.kwargs)
    kernel = zoo.to_numpy(ntkcore.ntk(built.model, poisoned, check_finite=False, **built.kwargs))
    assert not np.isfinite(kernel).all()  # computed as asked


def test_nonfinite_kernel_from_finite_inputs(backend, zoo):
    """A linear model's kernel is x1·x2 + 1: entries of 1e160 overflow float64 in it."""
    model = zoo.linear(np.ones((2, 1)), np.zeros(1))
    x = np.full((2, 2), 1e160)
    for implementation in IMPLEMENTATIONS:
        with pytest.raises(FloatingPointError, match=r"non-finite entry at index \(0, 0.*from finite inputs"):
            ntkcore.ntk(model.model, x, implementation=implementation, **model.kwargs)


@pytest.mark.parametrize("side", ["x1", "x2"])
def test_empty_batches(backend, zoo, side):
    built, x1, x2 = _mlp(zoo)
    empty = np.ones((0, 6))
    pair = (empty, x2) if side == "x1" else (x1, empty)
    for implementation in IMPLEMENTATIONS:
        with pytest.raises(ValueError, match=rf"{side} has no examples \(shape \(0, 6\)\)"):
            ntkcore.ntk(built.model, *pair, implementation=implementation, **built.kwargs)


def test_wrong_inputs_are_named(backend, zoo):
    built, x1, _ = _mlp(zoo)
    with pytest.raises(ntkcore.ModelCallError, match=r"^x1: the model cannot be evaluated on examples of shape \(7,\)"):
        ntkcore.ntk(built.model, np.ones((3, 7)), **built.kwargs)
    with pytest.raises(TypeError, match=r"^x2 has dtype int"):
        ntkcore.ntk(built.model, x1, np.ones((3, 6), dtype=np.int64), **built.kwargs)


def test_native_inputs_take_the_parameters_dtype(backend, zoo):
    """Native inputs of another float dtype are converted, as numpy ones are."""
    built, x1, x2 = _mlp(zoo)
    expected = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, **built.kwargs))
    kernel = ntkcore.ntk(built.model, zoo.to_native(x1, "float32"), zoo.to_native(x2, "float32"), **built.kwargs)
    assert zoo.is_native(kernel, "float64")
    rounding = np.abs(expected).max() * 1e-6  # the inputs were rounded to float32 on the way
    np.testing.assert_allclose(zoo.to_numpy(kernel), expected, atol=rounding)


# -- models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["centering", "batch_statistic", "across_examples"])
def test_coupled_models_are_refused(backend, zoo, how):
    built = zoo.coupled_models()[how]
    x1, x2 = inputs("mlp")
    for implementation in IMPLEMENTATIONS:
        with pytest.raises(ntkcore.BatchCouplingError, match=r"examples interact .* batch_independent=False"):
            ntkcore.ntk(built.model, x1, x2, implementation=implementation, **built.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ntkcore.StructuredFallbackWarning)
        kernel = ntkcore.ntk(built.model, x1, x2, batch_independent=False, **built.kwargs)
    assert np.isfinite(zoo.to_numpy(kernel)).all()


def test_params_that_do_not_match(backend, zoo):
    x1, _ = inputs("mlp")
    for built, error, pattern in zoo.bad_params():
        with pytest.raises(error, match=pattern):
            ntkcore.ntk(built.model, x1, **built.kwargs)


def test_every_params_mismatch_is_named_at_once(backend, zoo):
    if zoo.bad_params_together is None:
        pytest.skip(f"{backend}: params are the model's own")
    built, names = zoo.bad_params_together()
    with pytest.raises(ValueError) as error:
        ntkcore.ntk(built.model, inputs("mlp")[0], **built.kwargs)
    assert all(f"params[{name!r}]" in str(error.value) for name in names), error.value


def test_auto_skips_an_implementation_that_raises(backend, zoo, monkeypatch):
    """The method auto picks raises (a framework without a batching rule, say): it is excluded
    for this model, with a warning and in ``explain``, and the next best gives the kernel."""
    from collections import OrderedDict

    from ntkcore import compiled

    built, x1, x2 = _mlp(zoo)
    expected = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, implementation="jacobian_contraction", **built.kwargs))
    first = ntkcore.explain(built.model, x1, x2, **built.kwargs).choice
    for cache in ("_COMPILED", "_CHOICES", "_FAILED"):  # compile afresh, with the broken method
        monkeypatch.setattr(compiled, cache, OrderedDict())

    def broken(self, *args, **kwargs):
        raise RuntimeError("no batching rule for this operation")

    monkeypatch.setattr(type(REGISTRY[first]), "kernel", broken)
    with pytest.warns(ntkcore.AutoFallbackWarning, match=rf'implementation="{first}" cannot run on this model'):
        kernel = ntkcore.ntk(built.model, x1, x2, **built.kwargs)
    np.testing.assert_allclose(zoo.to_numpy(kernel), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    explanation = ntkcore.explain(built.model, x1, x2, **built.kwargs)
    assert first not in explanation.estimates and "no batching rule" in explanation.failed[first]
    assert f"{first}: not a candidate (it raised on this model" in str(explanation)


def test_explicit_implementation_over_the_memory_budget(backend, zoo):
    built, x1, x2 = _mlp(zoo)
    with pytest.raises(ntkcore.MemoryBudgetError, match=r"implementation='jacobian_contraction' is predicted to need"):
        ntkcore.ntk(built.model, x1, x2, implementation="jacobian_contraction", memory_budget=100, **built.kwargs)


@pytest.mark.parametrize("axes", [{"trace_axes": (-1,)}, {"trace_axes": (-1,), "diagonal_axes": (0,)}])
@pytest.mark.parametrize("same", [True, False])
def test_traced_jacobian_contraction_streams_over_output_chunks(backend, zoo, monkeypatch, axes, same):
    """With every output axis traced, Jacobian contraction holds the Jacobians of a chunk of
    outputs at a time (here 2 of 3: 2·N·P elements allowed) and sums the chunks: the same
    kernel, whole and per layer, and a peak predicted at the chunk's size."""
    from collections import OrderedDict

    from ntkcore import compiled
    from ntkcore.implementations import jacobian_contraction as jc

    built, x1, x2 = _mlp(zoo)
    x1 = x1[: x2.shape[0]] if "diagonal_axes" in axes else x1  # pairs x1[i] with x2[i]
    x2 = None if same else x2
    options = {"implementation": "jacobian_contraction", **axes, **built.kwargs}
    whole = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, **options))
    layers = {k: zoo.to_numpy(v) for k, v in ntkcore.ntk(built.model, x1, x2, per_layer=True, **options).items()}
    before = ntkcore.explain(built.model, x1, x2, **options).estimates["jacobian_contraction"].peak_bytes
    params = sum(
        int(np.prod(p.shape))
        for p in ntkcore.get_backend(backend).prepare(built.model, built.kwargs.get("params")).params.values()
    )
    nx = x1.shape[0] + (0 if same else x2.shape[0])
    for cache in ("_COMPILED", "_CHOICES"):  # compile afresh, with the smaller chunks
        monkeypatch.setattr(compiled, cache, OrderedDict())
    monkeypatch.setattr(jc, "JACOBIAN_ELEMENTS", 2 * nx * params)
    assert jc.output_chunk(ntkcore.axes.KernelAxes(2, (1,), ()), nx, 3, params) == 2
    chunked = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, **options))
    per_layer = ntkcore.ntk(built.model, x1, x2, per_layer=True, **options)
    after = ntkcore.explain(built.model, x1, x2, **options).estimates["jacobian_contraction"].peak_bytes
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    for name, part in per_layer.items():
        np.testing.assert_allclose(zoo.to_numpy(part), layers[name], rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    assert after < before


@pytest.mark.parametrize("axes", [{"trace_axes": (-1,)}, {"trace_axes": (-1,), "diagonal_axes": (0,)}])
@pytest.mark.parametrize("same", [True, False])
def test_traced_structured_derivatives_stream_over_output_chunks(backend, zoo, monkeypatch, axes, same):
    """With every output axis traced, structured derivatives take the cotangents of one chunk of
    outputs at a time (here one output: the limit set to one element) and sum the chunks: the
    same kernel, whole and per layer, and a smaller predicted peak."""
    from collections import OrderedDict

    from ntkcore import compiled
    from ntkcore.implementations import jacobian_contraction as jc
    from ntkcore.implementations import structured

    built, x1, x2 = _mlp(zoo)
    x1 = x1[: x2.shape[0]] if "diagonal_axes" in axes else x1
    x2 = None if same else x2
    options = {"implementation": "structured", **axes, **built.kwargs}
    whole = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, **options))
    layers = {k: zoo.to_numpy(v) for k, v in ntkcore.ntk(built.model, x1, x2, per_layer=True, **options).items()}
    before = ntkcore.explain(built.model, x1, x2, **options).estimates["structured"].peak_bytes
    for cache in ("_COMPILED", "_CHOICES"):  # compile afresh, with the smaller chunks
        monkeypatch.setattr(compiled, cache, OrderedDict())
    monkeypatch.setattr(jc, "JACOBIAN_ELEMENTS", 1)
    chunks = []
    assembled = structured._assembled

    def spy(*args, **kwargs):
        chunks.append(args[-1] if len(args) == 10 else kwargs.get("components"))
        return assembled(*args, **kwargs)

    monkeypatch.setattr(structured, "_assembled", spy)
    chunked = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, **options))
    per_layer = ntkcore.ntk(built.model, x1, x2, per_layer=True, **options)
    after = ntkcore.explain(built.model, x1, x2, **options).estimates["structured"].peak_bytes
    assert chunks[:3] == [slice(0, 1), slice(1, 2), slice(2, 3)], chunks
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    for name, part in per_layer.items():
        np.testing.assert_allclose(zoo.to_numpy(part), layers[name], rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    assert after < before


# -- stores ------------------------------------------------------------------------------------
def _zarr_chunks(out: Path) -> list[Path]:
    return sorted(p for p in (out / "c").rglob("*") if p.is_file())


def _damage_zarr(out: Path, how: str) -> None:
    chunks = _zarr_chunks(out)
    if how == "corrupted bytes":
        data = bytearray(chunks[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunks[0].write_bytes(bytes(data))
    elif how == "missing chunk":
        chunks[1].unlink()
    elif how == "swapped chunks":
        first, second = chunks[0].read_bytes(), chunks[2].read_bytes()
        chunks[0].write_bytes(second)
        chunks[2].write_bytes(first)
    else:  # the whole c/ folder deleted
        for chunk in chunks:
            chunk.unlink()


def _damage_npy(out: Path, how: str) -> None:
    if how == "truncated":
        with open(out, "r+b") as handle:
            handle.truncate(out.stat().st_size // 2)
    elif how == "overwritten":
        array = np.lib.format.open_memmap(out, mode="r+")
        array[:] = 7.0
        array.flush()
        del array
    else:  # the .npy deleted, its markers kept
        out.unlink()


@pytest.mark.parametrize(
    "kind,how",
    [("zarr", h) for h in ("corrupted bytes", "missing chunk", "swapped chunks", "deleted folder")]
    + [("npy", h) for h in ("truncated", "overwritten", "deleted with its markers")],
)
def test_damaged_store_is_recomputed(backend, zoo, tmp_path, kind, how):
    built, x1, _ = _mlp(zoo)
    expected = zoo.to_numpy(ntkcore.ntk(built.model, x1, **built.kwargs))
    out = tmp_path / f"kernel.{kind}"
    ntkcore.ntk(built.model, x1, batch_size=2, out=out, **built.kwargs)
    (_damage_zarr if kind == "zarr" else _damage_npy)(out, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = ntkcore.ntk(built.model, x1, batch_size=2, out=out, **built.kwargs)
    np.testing.assert_allclose(np.asarray(kernel[...]), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    if how != "deleted with its markers":  # a missing .npy is a fresh store: nothing to report
        assert any("damaged" in str(w.message) for w in caught)


_KILL_AT_FINGERPRINT = """
import os, signal, sys
import ntkcore.stores as stores
original = stores._atomic_write
def dying(path, text):
    if path.name == "fingerprint.json":
        os.kill(os.getpid(), signal.SIGKILL)
    original(path, text)
stores._atomic_write = dying
from ntkcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind", ["zarr", "npy"])
def test_kill_between_creating_the_array_and_its_fingerprint(tmp_path, kind):
    torch = pytest.importorskip("torch")
    from tests.models import slow_torch

    x1 = tmp_path / "x1.npy"
    np.save(x1, slow_torch.x)
    out = tmp_path / f"kernel.{kind}"
    args = ["compute", "--model", "tests.models.slow_torch:model", "--x1", str(x1), "--out", str(out)]
    job = subprocess.run([sys.executable, "-c", _KILL_AT_FINGERPRINT, *args, "--batch-size", "12"], cwd=REPO)
    assert job.returncode == -signal.SIGKILL
    kernel = ntkcore.ntk(slow_torch.model, slow_torch.x, batch_size=12, out=out)  # no overwrite needed
    expected = ntkcore.ntk(slow_torch.model, torch.as_tensor(slow_torch.x)).numpy()
    np.testing.assert_allclose(np.asarray(kernel[...]), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


def test_full_disk_is_a_clear_error(backend, zoo, tmp_path):
    """A .npy store's space is reserved up front: a full disk is an OSError, never SIGBUS."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        built, x1, _ = _mlp(zoo)
        many = np.tile(x1, (16, 1))  # 64 examples: 64·64·3·3 float64 entries, 295 kB
        with pytest.raises(OSError, match="not enough free disk space for the kernel"):
            ntkcore.ntk(built.model, many, batch_size=16, out=mount / "kernel.npy", **built.kwargs)
        assert not (mount / "kernel.npy").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_two_writers(backend, zoo, tmp_path):
    built, x1, _ = _mlp(zoo)
    out = tmp_path / "kernel.zarr"
    lock = Path(f"{out}.ntkcore.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        with pytest.raises(ntkcore.StoreLockedError, match=rf"out='{re.escape(str(out))}' is being written by another"):
            ntkcore.ntk(built.model, x1, batch_size=2, out=out, **built.kwargs)
    finally:
        holder.kill()
        holder.wait()
    kernel = ntkcore.ntk(built.model, x1, batch_size=2, out=out, **built.kwargs)  # its process is gone: taken over
    assert np.isfinite(np.asarray(kernel[...])).all() and not lock.exists()


def test_progress_off_a_terminal_is_logged(backend, zoo, tmp_path, caplog):
    built, x1, _ = _mlp(zoo)
    out = tmp_path / "kernel.zarr"
    with caplog.at_level(logging.INFO, logger="ntkcore"):
        ntkcore.ntk(built.model, x1, batch_size=2, out=out, **built.kwargs)
    assert any("3/3 tiles" in r.getMessage() for r in caplog.records)
    caplog.clear()
    (out / "ntkcore" / "done" / "0.1").unlink()
    half_written = out / "ntkcore" / "done" / ".0.1.4242.tmp"  # a writer killed mid-marker
    half_written.write_text('{"sha')
    with caplog.at_level(logging.INFO, logger="ntkcore"):
        ntkcore.ntk(built.model, x1, batch_size=2, out=out, **built.kwargs)
    assert any("resuming: 2 of 3 tiles already done" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (out / "ntkcore" / "done").iterdir()) == ["0.0", "0.1", "1.1"]


# -- the command line --------------------------------------------------------------------------
def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "ntkcore", *args], cwd=cwd, capture_output=True, text=True, env=env)


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("ntkcore:")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_cli_errors_are_one_line(tmp_path):
    x1 = tmp_path / "x1.npy"
    np.save(x1, np.ones((4, 6)))
    assert "no module named 'no_such_module'" in _error_line(_cli("explain", "no_such_module:model", "--shape", "4,6"))
    assert "has no attribute 'nope'" in _error_line(_cli("explain", "tests.models.spec:nope", "--shape", "4,6"))
    assert "must be given as module:attribute" in _error_line(_cli("explain", "tests", "--shape", "4,6"))
    line = _error_line(_cli("explain", "tests.models.spec:x", "--shape", "4,6", "--trace-axes", "last"))
    assert "--trace-axes takes comma-separated integers" in line
    assert "cannot read" in _error_line(_cli("compute", "--model", "a:b", "--x1", "missing.npy", "--out", "k.zarr"))
    assert "invalid choice" in _error_line(_cli("bogus"))
    debug = _cli("--debug", "explain", "no_such_module:model", "--shape", "4,6")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_cli_store_mismatch_names_the_flag(tmp_path):
    pytest.importorskip("torch")
    x1, other = tmp_path / "x1.npy", tmp_path / "other.npy"
    from tests.models import slow_torch

    np.save(x1, slow_torch.x)
    np.save(other, slow_torch.x + 1)
    out = str(tmp_path / "kernel.zarr")
    common = ["compute", "--model", "tests.models.slow_torch:model", "--out", out, "--batch-size", "12"]
    assert _cli(*common, "--x1", str(x1)).returncode == 0
    line = _error_line(_cli(*common, "--x1", str(other)))
    assert "Pass --overwrite to replace it" in line and "overwrite=True" not in line


# -- analysis ----------------------------------------------------------------------------------
def test_spectrum_of_an_operator_forms_a_kernel_that_fits(backend, zoo):
    built, _, _ = _mlp(zoo)
    x1 = np.random.default_rng(5).normal(size=(40, 6))  # Lanczos' 20 vectors do not span the 40 dimensions
    op = ntkcore.ntk_operator(built.model, x1, trace_axes=(-1,), **built.kwargs)
    exact = np.linalg.eigvalsh(zoo.to_numpy(ntkcore.ntk(built.model, x1, trace_axes=(-1,), **built.kwargs)))
    result = ntkcore.spectrum(op, k=1, which="smallest")
    assert result.lambda_min == pytest.approx(exact[0], rel=1e-9)
    with pytest.raises(ntkcore.ConvergenceError, match=r"Lanczos found \d+ of the k=2 smallest eigenvalues"):
        ntkcore.spectrum(op, k=2, which="smallest", method="lanczos", maxiter=1)


def test_gd_mse_refuses_a_diverging_step(backend, zoo):
    built, x1, _ = _mlp(zoo)
    kernel = ntkcore.ntk(built.model, x1, trace_axes=(-1,), **built.kwargs)
    largest = ntkcore.max_learning_rate(kernel)
    y = zoo.to_native(np.ones((len(x1), 1)), "float64")
    with pytest.raises(ValueError, match="at or above max_learning_rate"):
        ntkcore.gd_mse(kernel, y, 10.0, learning_rate=2 * largest, discrete=True)
    ntkcore.gd_mse(kernel, y, 10.0, learning_rate=0.5 * largest, discrete=True)


# -- which parameters are θ ---------------------------------------------------------------------
def test_trainable_chooses_the_parameters(backend, zoo):
    from ntkcore.arrays import layer_name

    built, x1, x2 = _mlp(zoo)
    layers = ntkcore.ntk(built.model, x1, x2, per_layer=True, **built.kwargs)
    implementations = [m for m in REGISTRY if m != "structured" or "structured" in zoo.CAPABILITIES]
    for chosen in (next(iter(layers)), list(layers)[-1]):  # not only a prefix of the parameters
        expected = zoo.to_numpy(layers[chosen])
        for implementation in implementations:
            kernel = ntkcore.ntk(
                built.model, x1, x2, trainable=lambda name, chosen=chosen: layer_name(name) == chosen,
                implementation=implementation, **built.kwargs,
            )  # fmt: skip
            np.testing.assert_allclose(zoo.to_numpy(kernel), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    with pytest.raises(TypeError, match="trainable must be None or a predicate"):
        ntkcore.ntk(built.model, x1, trainable="l1", **built.kwargs)
