"""A garbage collection while this process takes a writer lock must not deadlock.

Taking a lock allocates, so a collection may run inside the guarded block of ``ProcessShare`` and finalize
an unreachable Checkpointer, whose ``__del__`` gives its share back in the same thread. The guard was a
plain ``threading.Lock``: the process hung for good (seen in a hypothesis test that restarts
Checkpointers). Run in a child process with a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import gc, sys
    from savegame import Checkpointer
    from savegame import lock

    acquire = lock.WriterLock.acquire

    def acquire_with_a_collection(self):  # a collection at the moment taking the lock allocates
        gc.collect()
        return acquire(self)

    lock.WriterLock.acquire = acquire_with_a_collection
    root = sys.argv[1]
    ck = Checkpointer(f"{root}/a")
    ck.cycle = ck  # only the cyclic collector can free it: its __del__ runs inside that collection
    del ck
    Checkpointer(f"{root}/b").close()
    print("done")
    """
)


def test_a_collection_while_taking_the_lock_does_not_deadlock(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
