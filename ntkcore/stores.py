"""Out-of-core kernel outputs: a zarr v3 array or a ``.npy`` memmap, written tile by tile.

Next to the data sits a small directory (``<out>/ntkcore`` for zarr, ``<out>.ntkcore`` for
``.npy``) with the fingerprint of what the store holds — the model's parameters, the inputs,
the options — and one marker file per finished tile. A marker is created (atomically, by a
rename) only after the tile's data is written and flushed, so after any interruption a
rerun computes exactly the tiles without a marker. A rerun with other parameters, inputs or
options is refused, and nothing is written, unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .axes import KernelAxes
from .tiling import Tile, index, mirror_order


def digest(*arrays: np.ndarray) -> str:
    """A SHA-256 of arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1).data if a.size else b"")
    return h.hexdigest()


def fingerprint(params: Mapping[str, np.ndarray], x1: np.ndarray, x2: np.ndarray | None, options: dict) -> dict:
    """What a store's kernel is of: hashes of the parameters and the inputs, and the options."""
    return {
        "parameters": digest(*(np.asarray(v) for v in params.values()))
        + hashlib.sha256("\0".join(params).encode()).hexdigest()[:16],
        "x1": digest(x1),
        "x2": None if x2 is None else digest(x2),
        "options": options,
    }


class StoreMismatchError(ValueError):
    """``out`` holds a kernel of other parameters, inputs or options."""


class KernelStore:
    """A kernel on disk, its fingerprint and the tiles already finished."""

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: str,
        stamp: dict,
        overwrite: bool,
    ) -> None:
        self.path = Path(path)
        self.kind = "zarr" if self.path.suffix == ".zarr" else "npy" if self.path.suffix == ".npy" else None
        if self.kind is None:
            raise ValueError(f"out={str(path)!r}: expected a path ending in .zarr (a zarr v3 array) or .npy (a memmap)")
        self.meta = self.path / "ntkcore" if self.kind == "zarr" else Path(f"{self.path}.ntkcore")
        self.shape, self.chunks, self.dtype = tuple(shape), tuple(chunks), dtype
        stamp = {**stamp, "shape": list(self.shape), "chunks": list(self.chunks), "dtype": dtype}
        if self.path.exists():
            found = self._stamp()
            if found != stamp and not overwrite:
                differs = sorted(k for k in stamp if found is None or found.get(k) != stamp.get(k))
                raise StoreMismatchError(
                    f"out={str(path)!r} already holds a kernel of other {', '.join(differs)} than this call's; "
                    "nothing was written. Pass overwrite=True to replace it, or choose another out"
                )
            if found != stamp:
                self._remove()
        if not self.path.exists():
            self._create(stamp)
        self.array = self._open("r+")

    @classmethod
    def reopen(cls, path: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str) -> KernelStore:
        """The store another process created and checked (a Dask worker's view of it)."""
        store = cls.__new__(cls)
        store.path = Path(path)
        store.kind = "zarr" if store.path.suffix == ".zarr" else "npy"
        store.meta = store.path / "ntkcore" if store.kind == "zarr" else Path(f"{store.path}.ntkcore")
        store.shape, store.chunks, store.dtype = tuple(shape), tuple(chunks), dtype
        store.array = store._open("r+")
        return store

    # -- layout ---------------------------------------------------------------------------
    def _stamp(self) -> dict | None:
        try:
            return json.loads((self.meta / "fingerprint.json").read_text())
        except (OSError, ValueError):
            return None

    def _remove(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path)
        else:
            self.path.unlink()
        shutil.rmtree(self.meta, ignore_errors=True)

    def _create(self, stamp: dict) -> None:
        if self.kind == "zarr":
            zarr = _zarr()
            zarr.create_array(self.path, shape=self.shape, chunks=self.chunks, dtype=self.dtype, zarr_format=3)
        else:
            np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape).flush()
        (self.meta / "done").mkdir(parents=True, exist_ok=True)
        _atomic_write(self.meta / "fingerprint.json", json.dumps(stamp, indent=1, sort_keys=True))

    def _open(self, mode: str) -> Any:
        if self.kind == "zarr":
            return _zarr().open_array(self.path, mode=mode, zarr_format=3)
        return np.lib.format.open_memmap(self.path, mode=mode)

    # -- tiles ----------------------------------------------------------------------------
    def done(self) -> set[str]:
        """Names of the finished tiles."""
        return {p.name for p in (self.meta / "done").iterdir() if not p.name.startswith(".")}

    def write(self, tile: Tile, block: np.ndarray, axes: KernelAxes, mirror: bool) -> None:
        """Write a tile (and, for a symmetric kernel, its mirror), flush, then mark it done."""
        self.array[index(tile, axes)] = block
        if mirror and not tile.symmetric:
            self.array[index(tile, axes, mirrored=True)] = np.transpose(block, mirror_order(axes))
        if self.kind == "npy":
            self.array.flush()
        _atomic_write(self.meta / "done" / tile.name, "")

    def result(self) -> Any:
        """The finished kernel, opened read-only."""
        return self._open("r")


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise ImportError("out='….zarr' needs zarr ≥ 3: pip install 'ntkcore[large]'") from None
    return zarr


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
