"""Uploading one data file: the sinks a remote transaction hands out (:class:`_MultipartSink` on S3,
:class:`_StreamSink` elsewhere), which keep memory bounded however large the file.

Files are streamed in parts of ``part_size`` bytes (8 MiB by default); at most ``max_concurrency``
parts are in flight, so an upload holds at most ``(max_concurrency + 1) * part_size`` bytes of
buffers. Whole parts of a large ``write`` are uploaded straight from the caller's memory; part
bodies are streamed from a file view (:class:`_BufferReader`), not copied by the HTTP client.
:meth:`~savegame.storage.remote.write.RemoteTransaction.open` makes them; they keep the sink
durability contract of :mod:`savegame.engine.write_loop` (``close`` completes the upload).
"""

from __future__ import annotations

import errno
import io
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from savegame._util.logs import get_logger
from savegame.errors import StorageError

if TYPE_CHECKING:
    from savegame.storage.remote.write import RemoteTransaction

log = get_logger("savegame")

_MAX_PARTS = 10_000


class _Sink:
    """A data file being uploaded (the :class:`~savegame.storage.base.FileSink` protocol)."""

    bytes_written: int
    path: str

    def write(self, data: bytes | bytearray | memoryview) -> int:
        raise NotImplementedError

    def seal(self) -> None:
        """No more writes will come: start uploading what is buffered (``close`` waits for it)."""

    def close(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError


class _BufferReader(io.RawIOBase):
    """A seekable read-only file over a part buffer, used as a request body.

    HTTP clients copy a ``bytes``/``bytearray`` body whole (aiohttp slices it, then joins it with the
    headers: two extra copies per request in flight); a file body is read in small chunks instead.
    """

    def __init__(self, buffer: bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(buffer).cast("B") if memoryview(buffer).format != "B" else memoryview(buffer)
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = self._view[self._pos : end].tobytes()
        self._pos = max(self._pos, end)
        return data

    def close(self) -> None:
        super().close()
        self._view.release()


def _bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _MultipartSink(_Sink):
    """S3: one multipart upload per file, parts uploaded by the transaction's threads.

    Memory: whole parts inside a large ``write`` (the tensor-file writer hands over 64 MiB slices of
    tensor memory) are uploaded straight from the caller's memory, several in parallel, and ``write``
    returns when they are stored, so no copy of them is ever made. Only what does not fill a whole part
    (headers, small tensors, the head and tail of a slice) is copied into a part buffer, which is
    uploaded in the background once full. At most ``max_concurrency`` requests are in flight (a
    semaphore blocks the writer beyond that), so buffers never exceed ``max_concurrency + 1`` parts
    and are in practice one or two. Files smaller than one part are a single PUT. Part sizes double
    every 1000 parts, so files up to about 80 TB fit S3's 10000-part limit.
    """

    def __init__(self, txn: RemoteTransaction, path: str) -> None:
        self._txn = txn
        self._st = txn.storage
        self.path = path
        self.where = self._st._where(path)
        self._bucket, self._key, _ = self._st.fs.split_path(path)
        self._buf: bytearray | None = None
        self._fill = 0
        self._upload_id: str | None = None
        self._next_part = 1
        self._etags: dict[int, str] = {}
        self._futures: list[Future[None]] = []
        self._sealed = False
        self._closed = False
        self.bytes_written = 0

    def _part_size(self) -> int:
        return self._st.part_size << min((self._next_part - 1) // 1000, 20)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._sealed:
            raise StorageError(errno.EINVAL, f"{self.where}: write after the file was finished")
        view = _bytes_view(data)
        total = len(view)
        direct: list[Future[None]] = []
        try:
            while len(view):
                part = self._part_size()
                if self._buf is None and len(view) >= part:
                    direct.append(self._submit_part(view[:part], recycle=False))  # zero-copy
                    view = view[part:]
                    continue
                if self._buf is None:
                    self._buf = self._txn._take_buffer(part)
                    self._fill = 0
                n = min(len(view), len(self._buf) - self._fill)
                self._buf[self._fill : self._fill + n] = view[:n]
                self._fill += n
                view = view[n:]
                if self._fill == len(self._buf):
                    self._submit(final=False)
        finally:
            for future in direct:  # the caller's memory must not be needed after we return
                try:
                    future.result()
                except BaseException:
                    pass
        for future in direct:
            future.result()
        self.bytes_written += total
        return total

    def _check(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                future.result()

    def _submit(self, *, final: bool) -> None:
        """Hand the current buffer to an upload thread (blocks while ``max_concurrency`` are in flight)."""
        self._check()
        buf, fill = self._buf if self._buf is not None else bytearray(), self._fill
        self._buf, self._fill = None, 0
        if fill < len(buf):
            del buf[fill:]  # the last part: shrink in place rather than copy
        if final and self._upload_id is None:
            self._txn._slots.acquire()
            self._futures.append(self._txn._executor().submit(self._put_whole, buf))
            return
        self._futures.append(self._submit_part(buf, recycle=True))

    def _submit_part(self, body: bytearray | memoryview, *, recycle: bool) -> Future[None]:
        """Start uploading the next part (blocks while ``max_concurrency`` requests are in flight)."""
        self._check()
        if self._upload_id is None:
            response = self._st._call(
                f"starting the upload of {self.where}", self._st.fs.call_s3, "create_multipart_upload",
                Bucket=self._bucket, Key=self._key,
            )  # fmt: skip
            self._upload_id = str(response["UploadId"])
        if self._next_part > _MAX_PARTS:
            raise StorageError(errno.EFBIG, f"{self.where}: more than {_MAX_PARTS} parts")
        number = self._next_part
        self._next_part += 1
        self._txn._slots.acquire()
        future = self._txn._executor().submit(self._put_part, number, body, recycle)
        self._txn._beat()
        return future

    def _request(self, method: str, buf: bytearray | memoryview, **kwargs: Any) -> Any:
        """One S3 request whose body is ``buf``, streamed from a fresh file view (so a retry re-reads it)."""
        body = _BufferReader(buf)
        try:
            return self._st.fs.call_s3(method, Body=body, ContentLength=len(buf), **kwargs)
        finally:
            body.close()

    def _put_whole(self, buf: bytearray) -> None:
        try:
            self._st._call(f"writing {self.where}", self._request, "put_object", buf,
                           Bucket=self._bucket, Key=self._key)  # fmt: skip
        finally:
            self._txn._slots.release()

    def _put_part(self, number: int, body: bytearray | memoryview, recycle: bool) -> None:
        try:
            response = self._st._call(
                f"uploading part {number} of {self.where}", self._request, "upload_part", body,
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number,
            )  # fmt: skip
            self._etags[number] = str(response["ETag"])
        finally:
            self._txn._slots.release()
            if recycle and isinstance(body, bytearray):
                self._txn._give_buffer(body)

    def seal(self) -> None:
        if self._sealed:
            return
        if self._fill > 0 or self._upload_id is None:
            self._submit(final=True)
        self._sealed = True

    def close(self) -> None:
        if self._closed:
            return
        self.seal()
        for future in self._futures:
            future.result()
        if self._upload_id is not None:
            parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
            self._st._call(
                f"completing the upload of {self.where}", self._st.fs.call_s3, "complete_multipart_upload",
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts},
            )  # fmt: skip
        self._closed = True

    def discard(self) -> None:
        self._sealed = self._closed = True
        self._buf = None
        for future in self._futures:
            future.cancel()
        for future in self._futures:
            if not future.cancelled():
                try:
                    future.result()
                except Exception:
                    pass
        if self._upload_id is not None:
            try:
                self._st._call(
                    f"aborting the upload of {self.where}", self._st.fs.call_s3, "abort_multipart_upload",
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                )  # fmt: skip
            except (StorageError, OSError) as exc:
                log.warning("%s", exc)


class _StreamSink(_Sink):
    """Any other fsspec backend: a streaming file object (the backend buffers and uploads blocks)."""

    def __init__(self, txn: RemoteTransaction, path: str) -> None:
        self._txn = txn
        self._st = txn.storage
        self.path = path
        self.where = self._st._where(path)
        self._st._ensure_parent(path)
        self._file: Any = self._st._call(f"creating {self.where}", self._st.fs.open, path, "wb",
                                         block_size=self._st.part_size)  # fmt: skip
        self._closed = False
        self.bytes_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise StorageError(errno.EINVAL, f"{self.where}: write after the file was finished")
        view = _bytes_view(data)
        try:
            for start in range(0, len(view), self._st.part_size):
                self._file.write(view[start : start + self._st.part_size])
        except Exception as exc:
            raise self._st._fail(exc, f"writing {self.where}") from None
        self.bytes_written += len(view)
        self._txn._beat()
        return len(view)

    def seal(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._file.close()
        except Exception as exc:
            raise self._st._fail(exc, f"finishing {self.where}") from None

    def discard(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            discard = getattr(self._file, "discard", None)
            if callable(discard):
                discard()
            else:
                self._file.close()
        except Exception:
            pass
