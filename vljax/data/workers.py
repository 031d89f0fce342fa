"""Grain worker processes that end with their parent, and shared memory released on close.

Grain (0.2.18) starts each `mp_prefetch` worker with multiprocessing's "spawn", from one of its
prefetch threads, and a worker stops only when its parent sets a `should_stop` event
(`grain/_src/python/dataset/transformations/process_prefetch.py`, `_put_dataset_elements_in_buffer`).
A parent killed by SIGKILL never sets it: its workers (and with them Python's `resource_tracker`,
which exits when the last holder of its pipe does) lived on. `exit_with_parent`, run in each worker,
ends the worker when its parent process is gone; the tracker then reads EOF, unlinks the shared
memory the dead processes left and exits.

PR_SET_PDEATHSIG does not fit: it fires when the parent *thread* that started the process ends, and
Grain starts workers from a thread-prefetch thread that it stops and restarts on `set_state` (every
checkpoint restore): the signal killed live workers there and the iterator hung.

Batches cross from workers in POSIX shared memory, and a segment is unlinked when the last array on it
is deleted (on a Grain background thread). Arrays alive when the interpreter tears down are never
unlinked: the resource tracker then warns of "leaked shared_memory objects" at exit. They are the
batches an unclosed iterator still buffers, and, once a worker's slice is exhausted, the last batch of
each worker: Grain's prefetch thread keeps it in a local of a frame that the StopIteration's traceback
holds in a reference cycle (`prefetch.py` `_put_iterator_elements_in_buffer`, `process_prefetch.py`
`__next__` re-raising `err`), which only the cyclic garbage collector frees.
`vljax.data.pipeline.close_iterator` stops the workers, empties the buffers and then calls
`release_shared_memory`; `release_shared_memory_at_exit` does the latter once more at exit, before
multiprocessing's own exit hook stops the release thread.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import signal
import threading

from absl import logging
from grain import multiprocessing as grain_mp

_SHM_RELEASE_TIMEOUT_S = 30.0
_exit_hook_registered = False


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
    """Grain `worker_init_fn`: ends this process, and kills its own children, when its parent ends.

    A daemon thread waits on the parent's sentinel, the pipe that multiprocessing's spawn keeps open in
    the parent, which reaches EOF when the parent process is gone, however it died. No polling."""
    del worker_index, worker_count
    parent = multiprocessing.parent_process()
    if parent is None:  # not started by multiprocessing: nothing to watch
        return
    threading.Thread(target=_exit_when_gone, args=(parent,), daemon=True,
                     name="vljax-exit-with-parent").start()


def _exit_when_gone(parent) -> None:
    parent.join()  # returns when the parent's end of the sentinel pipe closes
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(1)  # no Python clean-up: the resource tracker unlinks this process's shared memory


def _children() -> list[int]:
    """This process's child pids (Linux /proc; empty elsewhere)."""
    pids = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def release_shared_memory(timeout: float = _SHM_RELEASE_TIMEOUT_S) -> None:
    """Unlinks the shared memory of every batch no longer referenced: frees garbage cycles holding
    batches, then waits for Grain's release thread to finish the unlinks queued so far."""
    gc.collect()
    _wait_for_release_thread(timeout)


def release_shared_memory_at_exit() -> None:
    """Registers `release_shared_memory` to run at exit (once per process). `atexit` runs its hooks
    last-registered first, so this runs before multiprocessing's exit hook (registered when
    `multiprocessing.util` was imported), which stops the release thread."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(release_shared_memory)
        _exit_hook_registered = True


def _wait_for_release_thread(timeout: float) -> None:
    """Waits until Grain's release thread has run the unlinks queued so far (`SharedMemoryArray.__del__`
    hands them to a thread pool that `ProcessPrefetchDatasetIterator.start_prefetch` enables); warns
    instead of raising after `timeout`."""
    pool = getattr(grain_mp.SharedMemoryArray, "_del_thread_pool", None)
    if pool is None:
        return
    # One barrier task per pool thread: when all of them have met, every task queued before them
    # (the pool's queue is FIFO) has run to completion.
    n = max(1, int(getattr(pool, "_processes", 1) or 1))
    barrier = threading.Barrier(n)
    try:
        results = [pool.apply_async(barrier.wait, (timeout,)) for _ in range(n)]
    except ValueError:  # the pool is no longer running (interpreter shutdown)
        return
    try:
        for r in results:
            r.get(timeout)
    except (multiprocessing.TimeoutError, threading.BrokenBarrierError):
        logging.warning("shared memory: Grain's release thread did not finish within %.0f s", timeout)
