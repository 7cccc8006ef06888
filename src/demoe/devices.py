"""Devices: which one a call runs on, and what suits each (tiles, batches, streams, precision)."""

from __future__ import annotations

import contextlib
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

#: Default tiles: big enough for the blur, small enough for the CPU cache (see benchmarks/).
DEFAULT_TILE = {"cpu": 256, "mps": 512, "cuda": 512}
#: Default tiles per network call: one on CPU keeps the working set in cache (4 was
#: 20-27 % slower there, benchmarks/batch_size.py); a GPU wants many.
DEFAULT_BATCH = {"cpu": 1, "mps": 8, "cuda": 16}
#: Default tile streams (tiles computed at once in parallel threads, torch's CPU threads
#: shared among them): on two cores, bare tiles in two one-thread streams ran 1.25-1.78x
#: as fast as in one two-thread stream, deblur() 0.96-1.25x (benchmarks/efficiency.py, README);
#: GPUs run one stream of big batches.
DEFAULT_STREAMS = {"cpu": 2}
#: Computation precision per device for ``precision="auto"`` (see benchmarks/inference_options.py).
AUTO_PRECISION = {"cuda": "fp16"}
#: The network's arithmetic per precision name: the autocast dtype (None: plain float32).
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda if available, else mps, else cpu.

    A device this machine does not have (``"cuda"`` without CUDA, ``"cuda:3"``
    with two GPUs, ``"mps"`` off a Mac, or any other kind) is a ``ValueError``
    that names the devices available.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    here = f"available here: auto, {', '.join(available_devices())}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; {here}") from err
    cuda = dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "cpu" or cuda or (dev.type == "mps" and mps is not None and mps.is_available()):
        return dev
    raise ValueError(f"device {str(device)!r} is not available on this machine; {here}")


def available_devices() -> list[str]:
    """Devices this machine can run on, best first."""
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def default_streams(device: torch.device) -> int:
    """:data:`DEFAULT_STREAMS` for ``device``, at most one per torch CPU thread."""
    return min(DEFAULT_STREAMS.get(device.type, 1), torch.get_num_threads())


@contextlib.contextmanager
def tile_streams(streams: int):
    """A pool of ``streams`` threads that each run tiles with their share of torch's CPU threads.

    Yields None for a single stream. torch's thread setting is process-wide for
    threads that start meanwhile, so it is put back on exit, whatever happens.
    """
    if streams <= 1:
        yield None
        return
    total = torch.get_num_threads()
    each = max(1, total // streams)

    def init_thread():
        torch.get_num_threads()  # let torch initialise this thread's setting first, then override it
        torch.set_num_threads(each)

    pool = ThreadPoolExecutor(streams, thread_name_prefix="demoe-tiles", initializer=init_thread)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(total)


# -- torch threads in dask tasks --------------------------------------------------------------
_tasks_lock = threading.Lock()
_tasks_running = 0  # chunk tasks inside chunk_threads() in this process
_process_setting = 1  # torch's process-wide thread setting, put back when the last of them ends
_thread = threading.local()  # per thread: its torch threads before any chunk task changed them


def task_threads(own: int) -> int:
    """torch threads for one dask task run in this thread, where torch would otherwise use ``own``.

    On a dask.distributed worker, one: a worker runs as many tasks at once as
    it has threads (``threads_per_worker``), so it uses that many cores, and
    workers that share a node share its cores as dask divided them. In the
    threaded scheduler's pool, ``own`` shared among the pool's threads. Else
    (the synchronous scheduler), ``own``.
    """
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            distributed.get_worker()
            return 1
        except ValueError:  # not in a worker's task
            pass
    pool = _dask_pool(threading.current_thread())
    return max(1, own // pool._max_workers) if pool is not None else own


def _dask_pool(thread: threading.Thread):
    """The pool of dask's threaded scheduler that ``thread`` belongs to, or None."""
    threaded = sys.modules.get("dask.threaded")
    if threaded is None:
        return None
    pools = [threaded.default_pool, *(p for per in list(threaded.pools.values()) for p in list(per.values()))]
    return next((p for p in pools if p is not None and thread in getattr(p, "_threads", ())), None)


@contextlib.contextmanager
def chunk_threads():
    """Run this thread's torch work on :func:`task_threads` threads; yields how many.

    ``torch.set_num_threads`` sets the calling thread's count and the
    process-wide one that threads starting meanwhile take: the process-wide
    setting is put back when the last chunk task of the process ends.
    """
    global _tasks_running, _process_setting
    with _tasks_lock:
        now = torch.get_num_threads()
        if now != getattr(_thread, "set_to", None):  # first seen, or set by someone else since: its own setting
            # (a thread first seen while tasks run took their setting when it started: the process's is the one)
            _thread.threads = now if _tasks_running == 0 else _process_setting
        if _tasks_running == 0:
            _process_setting = _thread.threads
        _tasks_running += 1
        threads = _thread.set_to = task_threads(_thread.threads)
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        with _tasks_lock:
            _tasks_running -= 1
            if _tasks_running == 0:
                torch.set_num_threads(_process_setting)
                _thread.set_to = _process_setting
