"""Process-wide worker thread pools, created on first use and forgotten in a forked child.

Hashing, fsyncs and snapshot copies each run on a small pool of their own. A forked child has none of
its parent's threads, so it must not queue work to them (it would wait forever): each pool is dropped
in the child and started again there on first use.
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor


class LazyPool:
    """A ``ThreadPoolExecutor`` of ``max_workers`` threads named ``name``, started on first :meth:`get`."""

    def __init__(self, name: str, max_workers: int) -> None:
        self.name = name
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        _pools.add(self)

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=self.name)
            return self._pool

    def _forget(self) -> None:
        self._pool = None
        self._lock = threading.Lock()


_pools: weakref.WeakSet[LazyPool] = weakref.WeakSet()


def _forget_all_after_fork() -> None:
    for pool in list(_pools):
        pool._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_after_fork)
