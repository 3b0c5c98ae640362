"""The tiled large-N path: a kernel computed tile by tile, in memory or into a store on disk,
in this process or as Dask tasks on a cluster, resumable after an interruption.

Every tile is an ordinary kernel call on slices of x1 and x2 (``implementation="auto"``
chooses per tile shape), so tiled and untiled kernels agree to float tolerance. Tiles go to a
``KernelStore`` as soon as they are done (``out=``), or are assembled in the caller's
framework at the end. On Dask, the model and the inputs are scattered to every worker once;
each task computes one tile and writes it into the shared store itself, so only tile names
travel back (or the tile, without a store). A worker lost mid-job loses nothing: Dask
reruns its tasks elsewhere, and a tile written twice holds the same numbers.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .axes import KernelAxes
from .explain import MemoryBudgetError
from .stores import KernelStore, fingerprint
from .tiling import Tile, assemble, plan


def tile_size(fn: Any, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes, on_disk: bool) -> int:
    """The largest tile (N, N/2, N/4, …) whose best implementation fits the memory budget,
    next to the kernel itself when it is assembled in memory."""
    budget = fn.budget()[0]
    n1 = x1.shape[0]
    n = max(n1, n1 if x2 is None else x2.shape[0])
    if budget is None:
        return n
    itemsize = fn.itemsize
    kernel_bytes = math.prod(axes.kernel_shape((n1, *out_shape), ((x1 if x2 is None else x2).shape[0], *out_shape)))
    kernel_bytes *= itemsize
    room = budget if on_disk else budget - kernel_bytes
    if room <= 0:
        raise MemoryBudgetError(
            f"{fn.explain(x1, x2).budget_message()} Tiles alone do not help here: the kernel itself takes "
            f"{kernel_bytes / 1e9:.3g} GB; out='kernel.zarr' (or a .npy path) writes it to disk tile by tile."
        )
    size = n
    while True:
        rows = x1[:size]
        cols = (x1 if x2 is None else x2)[:size]  # off-diagonal tiles: two sides
        estimates = fn.estimates(rows, cols, out_shape, axes)
        if min(e.peak_bytes for e in estimates.values()) <= room:
            return size
        if size == 1:
            break
        size = (size + 1) // 2
    raise MemoryBudgetError(
        f"{fn.explain(x1, x2).budget_message()} Even tiles of one example need more than the "
        f"{room / 1e9:.3g} GB left of it."
    )


def _progress(progress: bool | None, total: int, description: str) -> Any:
    """A tqdm bar over tiles; ``None`` shows it only on a terminal, ``False`` never."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, unit="tile", desc=description, disable=not show, dynamic_ncols=True)


def compute(
    fn: Any,
    x1: Any,
    x2: Any,
    out_shape: tuple[int, ...],
    axes: KernelAxes,
    *,
    batch_size: int,
    out: Any,
    overwrite: bool,
    progress: bool | None,
    executor: Any,
) -> Any:
    """The kernel of ``fn`` between ``x1`` and ``x2``, tile by tile (see the module docstring)."""
    backend = fn.backend
    n1 = x1.shape[0]
    n2 = None if x2 is None else x2.shape[0]
    tiles = plan(n1, n2, batch_size, axes)
    shape = axes.kernel_shape((n1, *out_shape), (n1 if n2 is None else n2, *out_shape))
    store = None
    if out is not None:
        chunks = (batch_size, *shape[1:]) if 0 in axes.diagonal else (batch_size, batch_size, *shape[2:])
        stamp = fingerprint(
            {k: backend.to_numpy(v) for k, v in fn.prepared.params.items()},
            backend.to_numpy(x1),
            None if x2 is None else backend.to_numpy(x2),
            fn.options(batch_size),
        )
        store = KernelStore(out, shape, chunks, fn.dtype_name, stamp, overwrite)
    done = store.done() if store is not None else set()
    todo = [t for t in tiles if t.name not in done]
    bar = _progress(progress, len(tiles), f"ntkcore {backend.name} kernel {shape}")
    bar.update(len(tiles) - len(todo))
    blocks: dict[tuple[int, int], Any] = {}
    started, written = time.perf_counter(), 0
    per_pair = math.prod(shape[1:] if 0 in axes.diagonal else shape[2:])
    run = _local if executor is None else _dask(executor, fn, out, store)
    for tile, block in run(fn, x1, x2, out_shape, axes, todo, store):
        if store is None:
            blocks[(tile.i, tile.j)] = block
        pairs = _length(tile.rows) * (1 if 0 in axes.diagonal else _length(tile.cols))
        written += pairs * per_pair * (2 if n2 is None and not tile.symmetric else 1)
        bar.update(1)
        bar.set_postfix(entries_per_s=f"{written / max(time.perf_counter() - started, 1e-9):.3g}", refresh=False)
    bar.close()
    if store is not None:
        return store.result()
    like = next(iter(fn.prepared.params.values()))
    blocks = {k: b if not isinstance(b, np.ndarray) else backend.asarray(b, like=like) for k, b in blocks.items()}
    return assemble(backend.namespace(like), blocks, tiles, axes)


def _length(s: slice) -> int:
    return s.stop - s.start


def _tile_inputs(x1: Any, x2: Any, tile: Tile) -> tuple[Any, Any]:
    rows = x1[tile.rows]
    if tile.symmetric:
        return rows, None
    return rows, (x1 if x2 is None else x2)[tile.cols]


def _local(
    fn: Any, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes, todo: list[Tile], store: Any
) -> Iterator[tuple[Tile, Any]]:
    """In this process, one tile after another."""
    for tile in todo:
        block = fn.untiled(*_tile_inputs(x1, x2, tile), out_shape, axes)
        if store is not None:
            store.write(tile, fn.backend.to_numpy(block), axes, mirror=x2 is None)
            block = None
        yield tile, block


def _dask(executor: Any, fn: Any, out: Any, store: Any) -> Callable:
    """Tiles as Dask tasks on ``executor`` (a ``distributed.Client`` or a scheduler address)."""

    def run(
        fn: Any, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes, todo: list[Tile], store: Any
    ) -> Iterator[tuple[Tile, Any]]:
        try:
            from distributed import Client, as_completed
        except ImportError:
            raise ImportError("executor= needs Dask: pip install 'ntkcore[large]'") from None

        client = executor if isinstance(executor, Client) else Client(executor)
        backend = fn.backend
        payload = {
            "kernel_fn": type(fn),  # pickled by reference: the worker imports it
            "fn": fn.spec(),
            "x1": backend.to_numpy(x1),
            "x2": None if x2 is None else backend.to_numpy(x2),
            "out": None if out is None else str(out),
            "store": None if store is None else (store.shape, store.chunks, store.dtype),
            "axes": axes,
            "out_shape": out_shape,
        }
        # pickled here, whole: Dask's own serialisation walks into containers and rebuilds a torch
        # module's hook OrderedDicts as dicts, on which the layer capture cannot register hooks
        import cloudpickle

        [shared] = client.scatter([cloudpickle.dumps(payload)], broadcast=True)  # once per worker
        futures = {client.submit(_dask_tile, shared, tile, pure=False): tile for tile in todo}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            if client is not executor:
                client.close()

    return run


_WORKER: dict = {}  # on a Dask worker: the payload's kernel function, inputs and store


def _dask_tile(blob: bytes, tile: Tile) -> Any:
    """One tile on a Dask worker; the kernel function, inputs and store are set up once per
    worker and payload (the scattered, pickled payload is one object per worker)."""
    import pickle

    if _WORKER.get("blob") is not blob:
        payload = pickle.loads(blob)
        fn = payload["kernel_fn"](**payload["fn"])
        x1, x2, _, _ = fn.resolve(payload["x1"], payload["x2"])
        store = None if payload["out"] is None else KernelStore.reopen(payload["out"], *payload["store"])
        _WORKER.clear()
        _WORKER.update(blob=blob, payload=payload, fn=fn, x1=x1, x2=x2, store=store)
    fn, store, payload = _WORKER["fn"], _WORKER["store"], _WORKER["payload"]
    block = fn.untiled(*_tile_inputs(_WORKER["x1"], _WORKER["x2"], tile), payload["out_shape"], payload["axes"])
    block = fn.backend.to_numpy(block)
    if store is None:
        return block
    store.write(tile, block, payload["axes"], mirror=payload["x2"] is None)
    return None
