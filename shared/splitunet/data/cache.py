"""A thread-safe LRU cache of decoded arrays, optionally backed by a folder on disk.

Decoding one real BraTS case (four gzipped 240x240x155 volumes) costs about 0.35 s per file set; a training
loop revisits each case every epoch, so the loader memoises what it decodes here.

- Entries are *bundles*: ``dict[str, np.ndarray]`` (e.g. the image array plus its affines).
- Keys are tuples of str/int/bool/tuples; the loader puts the kind, a format version, the case id, the
  modalities and every source file's :func:`file_signature` (path, mtime, size) in them, so a changed file
  misses the cache instead of returning stale data.
- Memory is bounded by a number of entries and a number of bytes (least recently used entries go first; an
  entry larger than ``max_bytes`` is returned but not kept).
- With ``disk_dir``, misses are looked up in (and stored to) ``<disk_dir>/<sha256 of key>.npz``, written
  atomically and read with ``allow_pickle=False``. The disk cache is not size-bounded: at full BraTS size one
  case's four normalised float32 modalities take ~140 MB.
- Concurrent requests for the same key load it once; the others wait for that result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

Bundle = dict[str, np.ndarray]


def file_signature(path: Path | str) -> tuple[str, int, int]:
    """``(resolved path, mtime in ns, size in bytes)`` of a file, for cache keys (follows symlinks)."""
    p = Path(path)
    st = p.stat()
    return (str(p.resolve()), int(st.st_mtime_ns), int(st.st_size))


@dataclass
class CacheStats:
    """Counters: memory hits, disk hits, loads (misses that ran the loader), evictions."""

    hits: int = 0
    disk_hits: int = 0
    loads: int = 0
    evictions: int = 0


class ArrayCache:
    """LRU cache of array bundles, bounded by entries and bytes, optionally persisted to ``disk_dir``.

    Args:
        max_items: most entries kept in memory (``None``: unbounded); ``0`` disables the memory level.
        max_bytes: most bytes of array data kept in memory (``None``: unbounded).
        disk_dir: folder for the on-disk level (created if missing), or ``None`` for memory only.
    """

    def __init__(
        self, max_items: int | None = 32, max_bytes: int | None = 8 * 2**30, disk_dir: Path | str | None = None
    ) -> None:
        if max_items is not None and max_items < 0:
            raise ValueError(f"max_items must be >= 0 or None (unbounded), got {max_items}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None (unbounded), got {max_bytes}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self._entries: OrderedDict[Hashable, tuple[Bundle, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}

    # ------------------------------------------------------------------ public
    def __getstate__(self) -> dict[str, object]:
        """A copy sent to another process (DataLoader workers under ``spawn``) starts empty, same bounds."""
        return {"max_items": self.max_items, "max_bytes": self.max_bytes, "disk_dir": self.disk_dir}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(**state)  # type: ignore[misc, arg-type]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes of array data held in memory."""
        with self._lock:
            return self._nbytes

    def clear(self) -> None:
        """Drop the memory level (the disk level is kept)."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def get_or_load(self, key: Hashable, load: Callable[[], Bundle]) -> Bundle:
        """The bundle for ``key``: from memory, else from disk, else ``load()`` (then stored in both).

        Arrays of a cached bundle are shared between callers: treat them as read-only.
        """
        with self._lock:
            hit = self._get_locked(key)
            if hit is not None:
                return hit
            key_lock = self._loading.setdefault(key, threading.Lock())
        try:
            with key_lock:
                with self._lock:
                    hit = self._get_locked(key)
                if hit is not None:
                    return hit
                bundle = self._disk_get(key)
                if bundle is None:
                    bundle = load()
                    with self._lock:
                        self.stats.loads += 1
                    self._disk_put(key, bundle)
                else:
                    with self._lock:
                        self.stats.disk_hits += 1
                with self._lock:
                    self._put_locked(key, bundle)
                return bundle
        finally:
            with self._lock:
                if self._loading.get(key) is key_lock and not key_lock.locked():
                    del self._loading[key]

    # ------------------------------------------------------------------ memory level (hold self._lock)
    def _get_locked(self, key: Hashable) -> Bundle | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def _put_locked(self, key: Hashable, bundle: Bundle) -> None:
        size = sum(int(a.nbytes) for a in bundle.values())
        if self.max_items == 0 or (self.max_bytes is not None and size > self.max_bytes):
            return
        if key in self._entries:
            self._nbytes -= self._entries.pop(key)[1]
        self._entries[key] = (bundle, size)
        self._nbytes += size
        while self._entries and (
            (self.max_items is not None and len(self._entries) > self.max_items)
            or (self.max_bytes is not None and self._nbytes > self.max_bytes)
        ):
            _, (_, old) = self._entries.popitem(last=False)
            self._nbytes -= old
            self.stats.evictions += 1

    # ------------------------------------------------------------------ disk level
    def _disk_path(self, key: Hashable) -> Path:
        assert self.disk_dir is not None
        digest = hashlib.sha256(repr(key).encode("utf-8")).hexdigest()
        return self.disk_dir / f"{digest}.npz"

    def _disk_get(self, key: Hashable) -> Bundle | None:
        if self.disk_dir is None:
            return None
        path = self._disk_path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except Exception as exc:  # a damaged cache file is a miss, not an error
            logger.warning("ignoring unreadable cache file %s (%s: %s)", path, type(exc).__name__, exc)
            return None

    def _disk_put(self, key: Hashable, bundle: Bundle) -> None:
        if self.disk_dir is None:
            return
        path = self._disk_path(key)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.disk_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **bundle)
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("could not write cache file %s (%s)", path, exc)
            Path(tmp).unlink(missing_ok=True)
