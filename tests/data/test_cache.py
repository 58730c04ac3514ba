"""ArrayCache: LRU bounds, disk level, invalidation on file change, one load under concurrency."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from splitunet.data.cache import ArrayCache, file_signature
from splitunet.data.layout import discover_cases
from splitunet.data.loader import load_images, load_label_map


def _bundle(value: float, n: int = 100) -> dict[str, np.ndarray]:
    return {"a": np.full(n, value, np.float32)}  # 4 * n bytes


def test_lru_by_items_and_bytes() -> None:
    cache = ArrayCache(max_items=2, max_bytes=None)
    for k in "abc":
        cache.get_or_load(k, lambda k=k: _bundle(ord(k)))
    assert "a" not in cache and "b" in cache and "c" in cache and cache.stats.evictions == 1
    cache.get_or_load("b", lambda: pytest.fail("b must be a hit"))  # touch b: c is now the oldest
    cache.get_or_load("d", lambda: _bundle(1))
    assert "c" not in cache and "b" in cache
    by_bytes = ArrayCache(max_items=None, max_bytes=1000)
    for k in range(4):
        by_bytes.get_or_load(k, lambda: _bundle(0))  # 400 bytes each
    assert len(by_bytes) == 2 and by_bytes.nbytes == 800
    by_bytes.get_or_load("big", lambda: _bundle(0, 1000))  # larger than the bound: returned, not kept
    assert "big" not in by_bytes and len(by_bytes) == 2
    with pytest.raises(ValueError, match="max_items"):
        ArrayCache(max_items=-1)


def test_concurrent_requests_load_once() -> None:
    cache = ArrayCache()
    calls = []

    def slow() -> dict[str, np.ndarray]:
        calls.append(1)
        time.sleep(0.05)
        return _bundle(3.0)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load("k", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 8
    assert all(r is results[0] for r in results)


def test_failed_load_is_not_cached() -> None:
    cache = ArrayCache()

    def boom() -> dict[str, np.ndarray]:
        raise RuntimeError("decode failed")

    with pytest.raises(RuntimeError):
        cache.get_or_load("k", boom)
    assert cache.get_or_load("k", lambda: _bundle(1.0))["a"][0] == 1.0


def test_loader_uses_memory_and_disk_cache(tmp_path: Path, brats) -> None:
    brats.write_cohort(tmp_path / "c", 1)
    (case,) = discover_cases(tmp_path / "c").values()
    disk = tmp_path / "cache"
    cache = ArrayCache(disk_dir=disk)
    first = load_images(case, cache=cache)
    again = load_images(case, cache=cache)
    assert cache.stats.loads == 1 and cache.stats.hits == 1
    assert again.array is first.array and not again.array.flags.writeable
    assert len(list(disk.glob("*.npz"))) == 1
    # a new process (fresh memory) reads the disk level
    fresh = ArrayCache(disk_dir=disk)
    from_disk = load_images(case, cache=fresh)
    assert fresh.stats.disk_hits == 1 and fresh.stats.loads == 0
    np.testing.assert_array_equal(from_disk.array, first.array)
    np.testing.assert_array_equal(from_disk.original_affine, first.original_affine)
    assert from_disk.original_shape == first.original_shape
    # labels are cached under their own key
    load_label_map(case, cache=fresh)
    assert fresh.stats.loads == 1


def test_changed_file_invalidates(tmp_path: Path, brats) -> None:
    d = brats.write_case(tmp_path, 0)
    (case,) = discover_cases(tmp_path).values()
    cache = ArrayCache(disk_dir=tmp_path / "cache")
    before = load_images(case, ["t1"], cache=cache, normalize=False).array.copy()
    sig = file_signature(case.images["t1"])
    images, _ = brats.make_volumes(0)
    brats.save_nifti(d / f"{d.name}_t1.nii.gz", images["t1"] * 2, brats.RAS_AFFINE)
    assert file_signature(case.images["t1"]) != sig
    after = load_images(case, ["t1"], cache=cache, normalize=False).array
    assert cache.stats.loads == 2
    np.testing.assert_allclose(after, before * 2)


def test_damaged_disk_entry_is_a_miss(tmp_path: Path) -> None:
    cache = ArrayCache(disk_dir=tmp_path)
    cache.get_or_load("k", lambda: _bundle(1.0))
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"garbage")
    fresh = ArrayCache(disk_dir=tmp_path)
    assert fresh.get_or_load("k", lambda: _bundle(2.0))["a"][0] == 2.0
    assert fresh.stats.loads == 1


def test_copy_for_worker_processes_starts_empty(tmp_path: Path) -> None:
    import copy

    cache = ArrayCache(max_items=3, max_bytes=10_000, disk_dir=tmp_path)
    cache.get_or_load("k", lambda: _bundle(1.0))
    clone = copy.deepcopy(cache)  # the same __getstate__ protocol DataLoader workers under "spawn" go through
    assert len(clone) == 0 and clone.max_items == 3 and clone.max_bytes == 10_000 and clone.disk_dir == tmp_path
    assert clone.get_or_load("k", lambda: pytest.fail("must come from disk"))["a"][0] == 1.0
