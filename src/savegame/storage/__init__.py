"""Where checkpoints live: the storage protocols and the local filesystem implementation."""

from __future__ import annotations

from .base import FileSink, Storage, Transaction
from .local import FileOps, LocalStorage

__all__ = ["FileOps", "FileSink", "LocalStorage", "Storage", "Transaction"]
