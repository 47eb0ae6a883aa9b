"""Whether a process still runs: the one test behind stale locks and abandoned staging folders."""

from __future__ import annotations

import os
import sys

__all__ = ["pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # there, os.kill(pid, 0) would *terminate* the process
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


if sys.platform == "win32":
    import ctypes

    def _windows_pid_alive(pid: int) -> bool:
        """Whether ``pid`` runs, from ``OpenProcess`` and ``GetExitCodeProcess`` (not tested in CI: no
        Windows runner)."""
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: exists, another user's
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
