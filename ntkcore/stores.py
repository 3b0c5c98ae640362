"""Out-of-core kernel outputs: a zarr v3 array or a ``.npy`` memmap, written tile by tile.

Next to the data sits a small directory (``<out>/ntkcore`` for zarr, ``<out>.ntkcore`` for
``.npy``) with the fingerprint of what the store holds — the model's parameters, the inputs,
the options — and one marker file per finished tile, holding the SHA-256 of the tile as
written. A marker is created (atomically, by a rename) only after the tile's data is written
and flushed, so after any interruption a rerun computes exactly the tiles without a marker.
Reopening a store reads every finished tile back and checks it against its marker
(``verify=False`` skips that): a tile whose data was damaged, deleted or swapped is computed
again. A rerun with other parameters, inputs or options is refused, and nothing is written,
unless ``overwrite=True``.

The array and its fingerprint are created under temporary names and renamed into place, so a
kill at any moment leaves either no store or a whole one. A ``.npy`` file's space is reserved
when it is created, so a full disk is an ``OSError`` then, not a crash while writing. One
process writes a store at a time: a lock file ``<out>.ntkcore.lock`` names the writer, and a
second process fails at once with a message naming the store (a lock whose process has died
on this host is taken over).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import socket
import time
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


class StoreLockedError(RuntimeError):
    """Another process is writing ``out``."""


class KernelStore:
    """A kernel on disk, its fingerprint and the tiles already finished (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: str,
        stamp: dict,
        overwrite: bool,
        verify: bool = True,
    ) -> None:
        self._layout(path, shape, chunks, dtype)
        if self.kind is None:
            raise ValueError(f"out={str(path)!r}: expected a path ending in .zarr (a zarr v3 array) or .npy (a memmap)")
        self.verify, self.damaged = verify, []
        self._lock = _Lock(Path(f"{self.path}.ntkcore.lock"), self.path)
        try:
            self._open_or_create(
                {**stamp, "shape": list(self.shape), "chunks": list(self.chunks), "dtype": dtype}, overwrite
            )
        except BaseException:
            self.close()
            raise

    @classmethod
    def reopen(cls, path: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str) -> KernelStore:
        """The store another process created, checked and locked (a Dask worker's view of it)."""
        store = cls.__new__(cls)
        store._layout(path, shape, chunks, dtype)
        store._lock, store.verify, store.damaged = None, False, []
        store.array = store._open("r+")
        return store

    def _layout(self, path: str | os.PathLike, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str) -> None:
        self.path = Path(path)
        self.kind = {".zarr": "zarr", ".npy": "npy"}.get(self.path.suffix)
        self.meta = self.path / "ntkcore" if self.kind == "zarr" else Path(f"{self.path}.ntkcore")
        self.shape, self.chunks, self.dtype = tuple(shape), tuple(chunks), dtype

    def _open_or_create(self, stamp: dict, overwrite: bool) -> None:
        if self.path.exists():
            found = self._stamp()
            if found != stamp and not overwrite:
                differs = sorted(k for k in stamp if found is None or found.get(k) != stamp.get(k))
                what = "no ntkcore fingerprint" if found is None else f"a kernel of other {', '.join(differs)}"
                raise StoreMismatchError(
                    f"out={str(self.path)!r} already holds {what} than this call's; nothing was written. "
                    "Pass overwrite=True to replace it, or choose another out"
                )
            if found != stamp:
                self._remove()
        if self.path.exists():
            for leftover in (self.meta / "done").glob(".*.tmp"):  # markers a killed writer left half-written
                leftover.unlink(missing_ok=True)
            try:
                self.array = self._open("r+")
                if tuple(self.array.shape) != self.shape or str(self.array.dtype) != self.dtype:
                    raise ValueError(f"it holds an array of shape {self.array.shape}, {self.array.dtype}")
                return
            except Exception as error:  # truncated, overwritten, unreadable: start again
                self.damaged = [f"the whole array ({error})"]
                self._remove()
        self._create(stamp)
        self.array = self._open("r+")

    # -- layout ---------------------------------------------------------------------------
    def _stamp(self) -> dict | None:
        try:
            return json.loads((self.meta / "fingerprint.json").read_text())
        except (OSError, ValueError):
            return None

    def _remove(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path)
        elif self.path.exists():
            self.path.unlink()
        shutil.rmtree(self.meta, ignore_errors=True)

    def _create(self, stamp: dict) -> None:
        """The array and its fingerprint under temporary names, then renamed into place."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        meta = temporary / "ntkcore" if self.kind == "zarr" else Path(f"{temporary}.ntkcore")
        for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp*"):  # a killed writer's; the lock is ours
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        try:
            if self.kind == "zarr":
                zarr = _zarr()
                compressors = [zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()]  # a damaged chunk fails to read
                zarr.create_array(
                    temporary, shape=self.shape, chunks=self.chunks, dtype=self.dtype, compressors=compressors
                )
            else:
                _reserve_npy(temporary, self.shape, self.dtype, self.path)
            (meta / "done").mkdir(parents=True, exist_ok=True)
            _atomic_write(meta / "fingerprint.json", json.dumps(stamp, indent=1, sort_keys=True))
            if self.kind == "npy":  # the fingerprint first: an .npy without one is never taken as ours
                shutil.rmtree(self.meta, ignore_errors=True)
                os.replace(meta, self.meta)
            os.replace(temporary, self.path)
        except BaseException:
            for leftover in (temporary, meta):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            raise

    def _open(self, mode: str) -> Any:
        if self.kind == "zarr":
            return _zarr().open_array(self.path, mode=mode, zarr_format=3)
        array = np.lib.format.open_memmap(self.path, mode=mode)
        if mode == "r+":  # numpy extends a short file sparsely: reserve what it added
            _reserve(self.path, self.path, self.path.stat().st_size, array.nbytes)
        return array

    # -- tiles ----------------------------------------------------------------------------
    def _regions(self, tile: Tile, axes: KernelAxes, mirror: bool) -> list[tuple[slice, ...]]:
        regions = [index(tile, axes)]
        if mirror and not tile.symmetric:
            regions.append(index(tile, axes, mirrored=True))
        return regions

    def is_done(self, tile: Tile) -> bool:
        """Whether the tile has its marker (written and flushed)."""
        return (self.meta / "done" / tile.name).exists()

    def done(self, tiles: list[Tile] | None = None, axes: KernelAxes | None = None, mirror: bool = False) -> set[str]:
        """Names of the finished tiles. With ``tiles`` and ``verify``, each is read back and
        checked against its marker; a damaged one loses its marker (and is listed in
        ``damaged``), so that it is computed again."""
        names = {p.name for p in (self.meta / "done").iterdir() if not p.name.startswith(".")}
        if not self.verify or tiles is None:
            return names
        for tile in tiles:
            if tile.name in names and not self._intact(tile, axes, mirror):
                names.discard(tile.name)
                self.damaged.append(tile.name)
                (self.meta / "done" / tile.name).unlink(missing_ok=True)
        return names

    def _intact(self, tile: Tile, axes: KernelAxes, mirror: bool) -> bool:
        try:
            recorded = json.loads((self.meta / "done" / tile.name).read_text())["sha256"]
            stored = [np.asarray(self.array[region]) for region in self._regions(tile, axes, mirror)]
        except Exception:  # no checksum, or a chunk that cannot be read or decoded
            return False
        return recorded == digest(*stored)

    def write(self, tile: Tile, block: np.ndarray, axes: KernelAxes, mirror: bool) -> None:
        """Write a tile (and, for a symmetric kernel, its mirror), flush, then mark it done
        with its checksum."""
        block = np.asarray(block, dtype=self.dtype)
        parts = [block]
        if mirror and not tile.symmetric:
            parts.append(np.transpose(block, mirror_order(axes)))
        for region, part in zip(self._regions(tile, axes, mirror), parts):
            self.array[region] = part
        if self.kind == "npy":
            self.array.flush()
        _atomic_write(self.meta / "done" / tile.name, json.dumps({"sha256": digest(*parts)}))

    def result(self) -> Any:
        """The finished kernel, opened read-only."""
        return self._open("r")

    def close(self) -> None:
        """Release the store's lock (a finished or failed job)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class _Lock:
    """``<out>.ntkcore.lock``: created exclusively, naming the process that writes the store."""

    def __init__(self, path: Path, store: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise StoreLockedError(
                        f"out={str(store)!r} is being written by another process (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('since')}); wait for it to finish, or remove "
                        f"{str(path)!r} if that process is gone"
                    ) from None
                path.unlink(missing_ok=True)  # a stale lock: its process is gone
                continue
            with os.fdopen(handle, "w") as file:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}, file)
            self.held = True
            return
        raise StoreLockedError(f"out={str(store)!r}: could not take its lock {str(path)!r}")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"pid": None, "host": None, "since": "being written"}  # just being created: held

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return True  # another host's, or unreadable: assume alive
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if getattr(self, "held", False):
            self.path.unlink(missing_ok=True)
            self.held = False


def _reserve_npy(path: Path, shape: tuple[int, ...], dtype: str, out: Path) -> None:
    """An ``.npy`` file with its whole size reserved on disk (a memmap over a sparse file dies of
    SIGBUS when the disk fills; a reservation fails now, with ``OSError``)."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    _reserve(path, out, path.stat().st_size, math.prod(shape) * np.dtype(dtype).itemsize)


def _reserve(path: Path, out: Path, size: int, data: int) -> None:
    """Disk blocks for all ``size`` bytes of ``path`` (the last ``data`` of them the array's)."""
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC,
                    f"out={str(out)!r}: not enough free disk space for the kernel ({size / 1e9:.3g} GB); "
                    "free some space or choose another out",
                ) from None
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            handle.seek(size - data)  # no fallocate on this filesystem: write the zeros after the header
            for start in range(0, data, 1 << 20):
                handle.write(bytes(min(1 << 20, data - start)))
            handle.flush()
            os.fsync(handle.fileno())


def _zarr() -> Any:
    try:
        import zarr
        import zarr.codecs
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
