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

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .axes import KernelAxes
from .explain import MemoryBudgetError
from .stores import KernelStore, fingerprint
from .tiling import Tile, assemble, plan

logger = logging.getLogger("ntkcore")


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


class _Progress:
    """Progress over tiles: a tqdm bar on a terminal, else (``progress=None``) a plain log line
    on the ``ntkcore`` logger every ``LOG_EVERY_S`` seconds — for batch systems, ``nohup`` and
    notebooks' log files. Rates count only the tiles computed in this run, not those a resumed
    run found done."""

    LOG_EVERY_S = 30.0

    def __init__(self, progress: bool | None, total: int, already: int, description: str) -> None:
        self.total, self.count, self.already, self.description = total, already, already, description
        self.started = self.last = time.perf_counter()
        terminal = sys.stderr.isatty()
        self.bar = None
        if progress or (progress is None and terminal):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=already, unit="tile", desc=description, dynamic_ncols=True)
        self.log = progress is None and not terminal
        if already and (self.log or self.bar is not None):
            self._say(f"resuming: {already} of {total} tiles already done")

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"{self.description}: {text}")
        else:
            logger.info("%s: %s", self.description, text)

    def update(self, entries_per_s: float) -> None:
        self.count += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(entries_per_s=f"{entries_per_s:.3g}", refresh=False)
        elif self.log and (now - self.last >= self.LOG_EVERY_S or self.count == self.total):
            self.last = now
            done = self.count - self.already
            self._say(
                f"{self.count}/{self.total} tiles, {done / max(now - self.started, 1e-9):.3g} tiles/s, "
                f"{entries_per_s:.3g} entries/s"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    verify: bool = True,
) -> Any:
    """The kernel of ``fn`` between ``x1`` and ``x2``, tile by tile (see the module docstring)."""
    n1 = x1.shape[0]
    n2 = None if x2 is None else x2.shape[0]
    tiles = plan(n1, n2, batch_size, axes)
    shape = axes.kernel_shape((n1, *out_shape), (n1 if n2 is None else n2, *out_shape))
    store = None if out is None else _store(fn, out, x1, x2, shape, axes, batch_size, overwrite, verify)
    try:
        return _run(fn, x1, x2, out_shape, axes, tiles, shape, store, out, progress, executor)
    finally:
        if store is not None:
            store.close()


def _store(
    fn: Any, out: Any, x1: Any, x2: Any, shape: tuple, axes: KernelAxes, batch_size: int, overwrite: bool, verify: bool
) -> KernelStore:
    backend = fn.backend
    chunks = (batch_size, *shape[1:]) if 0 in axes.diagonal else (batch_size, batch_size, *shape[2:])
    stamp = fingerprint(
        {k: backend.to_numpy(v) for k, v in fn.prepared.params.items()},
        backend.to_numpy(x1),
        None if x2 is None else backend.to_numpy(x2),
        fn.options(batch_size),
    )
    return KernelStore(out, shape, chunks, fn.dtype_name, stamp, overwrite, verify=verify)


def _run(
    fn: Any,
    x1: Any,
    x2: Any,
    out_shape: tuple[int, ...],
    axes: KernelAxes,
    tiles: list[Tile],
    shape: tuple,
    store: KernelStore | None,
    out: Any,
    progress: bool | None,
    executor: Any,
) -> Any:
    """The tiles not yet done (all of them without a store), then the kernel."""
    backend = fn.backend
    done = store.done(tiles, axes, mirror=x2 is None) if store is not None else set()
    if store is not None and store.damaged:
        warnings.warn(
            f"out={str(out)!r}: {len(store.damaged)} finished tile(s) were damaged "
            f"({', '.join(store.damaged[:8])}{', …' if len(store.damaged) > 8 else ''}); computing them again",
            stacklevel=5,
        )
    todo = [t for t in tiles if t.name not in done]
    bar = _Progress(progress, len(tiles), len(tiles) - len(todo), f"ntkcore {backend.name} kernel {shape}")
    blocks: dict[tuple[int, int], Any] = {}
    started, written = time.perf_counter(), 0
    per_pair = math.prod(shape[1:] if 0 in axes.diagonal else shape[2:])
    run = _local if executor is None else _dask(executor, fn, out, store)
    for tile, block in run(fn, x1, x2, out_shape, axes, todo, store):
        if store is None:
            blocks[(tile.i, tile.j)] = block
        pairs = _length(tile.rows) * (1 if 0 in axes.diagonal else _length(tile.cols))
        written += pairs * per_pair * (2 if x2 is None and not tile.symmetric else 1)
        bar.update(written / max(time.perf_counter() - started, 1e-9))
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
    if store is not None and store.is_done(tile):  # a rerun of a lost worker's task: already written
        return None
    block = fn.untiled(*_tile_inputs(_WORKER["x1"], _WORKER["x2"], tile), payload["out_shape"], payload["axes"])
    block = fn.backend.to_numpy(block)
    if store is None:
        return block
    store.write(tile, block, payload["axes"], mirror=payload["x2"] is None)
    return None
