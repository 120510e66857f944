"""A process pool for per-image work (circularity-check, prepare-data, identity-check): a clean
fork server, one OpenCV thread per worker, and chunks that shrink towards the end.

`chunked_map` is the interface (and `resolve_workers` for a `workers` setting): results in the items' order, inline when one worker is asked
for, so a run's output does not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import platform
from collections.abc import Callable, Iterator
from typing import TypeVar

from pipeline.common.errors import UserError

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int) -> int:
    """A `workers` setting (prepare.workers, identity.workers): 0 → min(4, CPUs); a negative count
    is a UserError."""
    if workers < 0:
        raise UserError(f"workers must be >= 1 (or 0 for min(4, CPUs)), got {workers}")
    return workers or min(4, os.cpu_count() or 1)


def guided_chunks(items: list, workers: int, largest: int = 64, smallest: int = 4) -> list[list]:
    """`items` in chunks that shrink towards the end (guided scheduling): each chunk costs the pool
    a few milliseconds of the parent's time (64 images: ~1%), and small last chunks let the
    workers finish together."""
    chunks, i = [], 0
    while i < len(items):
        size = max(smallest, min(largest, (len(items) - i) // (2 * workers)))
        chunks.append(items[i : i + size])
        i += size
    return chunks


def pool_context(preload: tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """Workers start from a clean fork server (or spawn): forking this process directly is unsafe
    once it holds threads (progress bars, BLAS) and can deadlock. The server imports the main module
    and the `preload` modules once, so that its workers start with them loaded."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", *preload])
        return ctx
    return multiprocessing.get_context("spawn")


# One BLAS/OpenMP thread per worker process: the pool is the parallelism (as OpenCV's one thread
# in `init_worker`). Set before the processes import NumPy, whose BLAS otherwise starts a thread per
# core in each of them, costing ~0.1 CPU-s apiece for nothing. A user's own setting is kept.
WORKER_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def worker_environment() -> Iterator[None]:
    """Within it, processes started (the fork server, spawned workers) get `WORKER_THREAD_ENV`."""
    added = {k: v for k, v in WORKER_THREAD_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def start_pool_server(preload: tuple[str, ...] = ()) -> None:
    """Start the fork server of `pool_context(preload)` now, where there is one, and return at once:
    its imports (the main module and `preload`) then overlap whatever the caller imports or does
    next, and `chunked_map`'s pool forks its workers from it without waiting for them."""
    if pool_context(preload).get_start_method() == "forkserver":
        with worker_environment():
            multiprocessing.forkserver.ensure_running()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """On glibc, keep freed memory (up to 16 MiB) in the process for the next allocation instead of
    handing it back to the system: per-image work allocates and frees the same arrays of 64 KiB to a
    few MiB image after image, which glibc's defaults (blocks from 128 KiB mapped and unmapped one
    by one, the heap trimmed above 128 KiB free) turn into page faults on every image (with this
    setting circularity-check's analysis took 0.80x the CPU time: docs/bench/
    circularity_before_after_2.txt). Elsewhere (macOS, musl, Windows) nothing changes."""
    if platform.libc_ver()[0] != "glibc":
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(M_MMAP_THRESHOLD, 4 << 20)  # blocks below 4 MiB come from the heap
    mallopt(M_TRIM_THRESHOLD, 16 << 20)  # the heap is trimmed once 16 MiB lie free at its top


def init_worker() -> None:
    """Pool initializer: one image per process, so no nested OpenCV threading; freed memory kept."""
    import cv2  # here, not at the top: a caller that starts the pool server early has not imported it yet

    cv2.setNumThreads(1)
    keep_freed_memory()


def _apply(func: Callable[[T], R], chunk: list[T]) -> list[R]:
    """`func` on each item of a chunk: one message to and from the pool per chunk."""
    return [func(item) for item in chunk]


def chunked_map(func: Callable[[T], R], items: list[T], workers: int,
                preload: tuple[str, ...] = ()) -> Iterator[list[R]]:
    """`func` over `items`, yielded in order as lists of results (one per chunk, for a progress bar).

    With workers <= 1 (or one item) it runs inline, one item per list (freed memory kept from then
    on: `keep_freed_memory`). Otherwise `func` (a module-level function or a `functools.partial` of
    one: it is pickled) runs in a pool of
    `workers` processes from `pool_context(preload)`; the fork server imports the caller's main
    module, so scripts calling this need the usual `if __name__ == "__main__":` guard."""
    if workers <= 1 or len(items) < 2:
        keep_freed_memory()
        for item in items:
            yield [func(item)]
        return
    with worker_environment():
        pool = pool_context(preload).Pool(min(workers, len(items)), initializer=init_worker)
    with pool:
        yield from pool.imap(functools.partial(_apply, func), guided_chunks(items, workers))
