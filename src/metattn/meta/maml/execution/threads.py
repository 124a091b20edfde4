"""Task threads: units of work (tasks) on worker threads, each with ONE intra-op thread.

Small convolutions and norms use two cores better as two tasks than as one task split in two
(Conv-4, meta-batch 32, 2 cores: docs/performance.md). Each worker runs on its own
structural replica of the model: ``functional_call`` swaps a module's tensors while it runs,
so one module object cannot serve two threads. A replica is ``copy.deepcopy`` of the modules
sharing the model's parameter and buffer tensors, made per call (about 1 ms), so it follows
the model's current mode and attributes. The caller's grad mode, autocast, context variables
(attention recording, the double-backward flag) and ``contexts()`` (the thread-local norm
rewrite) go with each unit.
"""

from __future__ import annotations

import contextvars
import copy
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from metattn.errors import ConfigError

_REPLICA: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar(
    "metattn_task_thread_model", default=None)
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def replica_of(model: nn.Module) -> nn.Module:
    """The model this unit runs: the worker thread's replica, or ``model`` itself outside."""
    replica = _REPLICA.get()
    return model if replica is None else replica


def _limit_threads(intra: int) -> None:
    """A worker's intra-op threads (``torch.set_num_threads`` is per thread under OpenMP: the
    caller keeps its own). ``get_num_threads`` first: torch's lazy per-thread setup would
    otherwise reset the count at the worker's first op."""
    torch.get_num_threads()
    torch.set_num_threads(intra)


def _pool(threads: int, intra: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` workers with ``intra`` intra-op threads each."""
    with _POOLS_LOCK:
        pool = _POOLS.get((threads, intra))
        if pool is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="metattn-task",
                                      initializer=_limit_threads, initargs=(intra,))
            _POOLS[(threads, intra)] = pool
        return pool


def runner(model: nn.Module, threads: int, contexts: Callable[[], AbstractContextManager]
           ) -> Callable[[Callable[[int], Any], int], Generator[Any, None, None]]:
    """``run_units(unit, n)``: yields ``unit(0..n-1)``, in order, computed on ``threads``
    worker threads, each unit on a replica of ``model`` (:func:`replica_of`)."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    try:
        free = [copy.deepcopy(model, dict(shared)) for _ in range(threads)]
    except Exception as err:  # noqa: BLE001  (any module state deepcopy cannot copy)
        raise ConfigError(f"MAML(task_threads={threads}): the model cannot be replicated for "
                          f"the worker threads ({err}); use task_threads=1") from err
    lock = threading.Lock()
    grad = torch.is_grad_enabled()
    amp, amp_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def job(unit: Callable[[int], Any], i: int) -> Any:
        with lock:
            mine = free.pop()
        token = _REPLICA.set(mine)
        try:
            with torch.set_grad_enabled(grad), \
                    torch.autocast("cpu", dtype=amp_dtype, enabled=amp), contexts():
                return unit(i)
        finally:
            _REPLICA.reset(token)
            with lock:
                free.append(mine)

    def run_units(unit: Callable[[int], Any], n: int) -> Generator[Any, None, None]:
        # the caller's own ops meanwhile (summing the gradients) on one thread: its OpenMP
        # team would otherwise wake for each of them and spin on the workers' cores; each
        # worker gets an equal share of the caller's threads (one each on 2 cores)
        caller_threads = torch.get_num_threads()
        pool = _pool(threads, max(1, caller_threads // threads))
        # at most 2 units per worker in flight: a finished unit holds a whole meta-gradient,
        # so the memory stays a few tasks' worth, as in the one-thread loop
        pending: deque[Future] = deque()
        submitted = 0

        def submit_upto(limit: int) -> None:
            nonlocal submitted
            while submitted < min(n, limit):
                pending.append(pool.submit(contextvars.copy_context().run, job, unit,
                                           submitted))
                submitted += 1

        torch.set_num_threads(1)
        try:
            submit_upto(2 * threads)
            done = 0
            while pending:
                result = pending.popleft().result()
                done += 1
                submit_upto(done + 2 * threads)
                yield result
                del result
        finally:
            for fut in pending:  # on an error: drop the queued units, wait for running ones
                fut.cancel()
            wait(list(pending))
            pending.clear()
            torch.set_num_threads(caller_threads)

    return run_units
