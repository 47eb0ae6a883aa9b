"""Events for the tools people watch training with (issue 18, part 2).

Real Checkpointer saves (sync and background), retention deletes, the quarantine of a corrupt
checkpoint, a restore and a preemption save reach the hooks with the right infos (compared with what
the files on disk say); a raising callback is logged and ignored, never losing the checkpoint; the log
line carries the same data; the TensorBoard, MLflow and W&B loggers write to the real libraries in a
temporary directory and the values are read back with each library's own reader; resuming prints one
line on stderr unless ``quiet=True``.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame
from savegame import BackgroundSaveError, Checkpointer, ConfigError
from savegame.events import (
    Callback,
    DeletedInfo,
    MLflowLogger,
    PreemptionInfo,
    QuarantinedInfo,
    RestoredInfo,
    SaveCommittedInfo,
    SaveFailedInfo,
    SaveStartedInfo,
    TensorBoardLogger,
    WandbLogger,
    save_metrics,
)
from savegame.storage.local import FileOps


class Recorder:
    """Records every event with the thread it arrived on."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.threads: list[threading.Thread] = []

    def _note(self, hook: str, info: Any) -> None:
        self.events.append((hook, info))
        self.threads.append(threading.current_thread())

    def on_save_started(self, info: SaveStartedInfo) -> None:
        self._note("started", info)

    def on_save_committed(self, info: SaveCommittedInfo) -> None:
        self._note("committed", info)

    def on_save_failed(self, info: SaveFailedInfo) -> None:
        self._note("failed", info)

    def on_deleted(self, info: DeletedInfo) -> None:
        self._note("deleted", info)

    def on_quarantined(self, info: QuarantinedInfo) -> None:
        self._note("quarantined", info)

    def on_restored(self, info: RestoredInfo) -> None:
        self._note("restored", info)

    def on_preemption_saved(self, info: PreemptionInfo) -> None:
        self._note("preemption", info)

    def of(self, hook: str) -> list[Any]:
        return [info for h, info in self.events if h == hook]

    @property
    def hooks(self) -> list[str]:
        return [h for h, _ in self.events]


class FullDisk(FileOps):
    def write(self, fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters())}


def _check_committed(info: SaveCommittedInfo, root: Path) -> None:
    """The info agrees with the committed checkpoint on disk."""
    manifest = savegame.read_manifest(root / info.name)
    assert info.path == str(root / info.name)
    assert info.bytes == manifest.total_bytes > 0
    assert manifest.progress["epoch"] == info.epoch and manifest.progress["step"] == info.step
    assert 0 < info.durable_seconds and 0 < info.blocking_seconds
    assert info.linked_bytes == manifest.linked_bytes
    assert info.throughput == pytest.approx((info.bytes - info.linked_bytes) / info.durable_seconds)


# --------------------------------------------------------------------------------------------------
# The hooks receive the right infos


def test_sync_saves_and_retention_reach_the_hooks_in_order(tmp_path: Path) -> None:
    rec = Recorder()
    state = _state()
    results = []
    with Checkpointer(tmp_path, keep_last=1, monitor="val_loss", callbacks=[rec]) as ckpt:
        for epoch, loss in ((1, 0.9), (2, 0.5), (3, 0.7)):
            results.append(ckpt.step(state, epoch=epoch, step=100 * epoch, metrics={"val_loss": loss}))
    # each save: started, (retention of the older ones), committed
    assert rec.hooks == ["started", "committed", "started", "deleted", "committed", "started", "committed"]
    started, committed = rec.of("started"), rec.of("committed")
    assert [s.name for s in started] == [c.name for c in committed] == [
        "epoch=001-step=000100", "epoch=002-step=000200", "epoch=003-step=000300"]
    assert all(not s.background for s in started)
    for info, result in zip(committed, results):
        assert result is not None and (info.bytes, info.blocking_seconds) == (result.size, result.seconds)
        if info.name != "epoch=001-step=000100":  # that one retention deleted
            _check_committed(info, tmp_path)
        assert info.blocking_seconds >= info.durable_seconds  # a sync save blocks until durable (and retention)
        assert not info.background
    assert [c.is_best for c in committed] == [True, True, False]
    assert committed[1].metrics == {"val_loss": 0.5}
    # keep_last=1 keeps the newest and the best (epoch 2): epoch 1 went, once epoch 2 was committed
    assert [(d.name, d.reason) for d in rec.of("deleted")] == [("epoch=001-step=000100", "retention")]
    assert not (tmp_path / "epoch=001-step=000100").exists()
    assert all(t is threading.main_thread() for t in rec.threads)


def test_a_background_commit_is_delivered_on_the_training_thread(tmp_path: Path) -> None:
    rec = Recorder()
    state = _state()
    ckpt = Checkpointer(tmp_path, background=True, every_n_epochs=2, callbacks=[rec])
    first = ckpt.step(state, epoch=2, step=20)
    assert first is not None and first.pending is not None
    assert rec.hooks == ["started"] and rec.of("started")[0].background
    first.pending.result()  # committed on the writer thread: not yet delivered
    assert rec.hooks == ["started"]
    assert ckpt.step(state, epoch=3, step=30) is None  # no save, but the call delivers the commit
    assert rec.hooks == ["started", "committed"]
    info = rec.of("committed")[0]
    _check_committed(info, tmp_path)
    assert info.background and info.name == first.name
    assert info.blocking_seconds == pytest.approx(first.seconds)
    assert info.durable_seconds >= info.blocking_seconds  # the write came after the snapshot
    ckpt.step(state, epoch=4, step=40)
    ckpt.close()  # close delivers the last one
    assert [c.name for c in rec.of("committed")] == [first.name, "epoch=004-step=000040"]
    assert all(t is threading.main_thread() for t in rec.threads)


def test_failed_saves_sync_and_background(tmp_path: Path) -> None:
    rec = Recorder()
    state = _state()
    ckpt = Checkpointer(tmp_path / "sync", callbacks=[rec])
    ckpt.save(state, epoch=1)
    ckpt.storage.ops = FullDisk()  # type: ignore[attr-defined]
    with pytest.raises(OSError, match="No space left") as raised:
        ckpt.save(state, epoch=2)
    (failed,) = rec.of("failed")
    assert failed.name == "epoch=002" and failed.epoch == 2 and failed.error is raised.value
    assert not failed.background
    assert [c.name for c in rec.of("committed")] == ["epoch=001"]
    ckpt.close()

    rec = Recorder()
    ckpt = Checkpointer(tmp_path / "bg", background=True, callbacks=[rec])
    ckpt.storage.ops = FullDisk()  # type: ignore[attr-defined]
    ckpt.save(state, epoch=1, step=7)
    with pytest.raises(BackgroundSaveError):
        ckpt.wait()
    (failed,) = rec.of("failed")
    assert (failed.name, failed.epoch, failed.step, failed.background) == ("epoch=001-step=000007", 1, 7, True)
    assert isinstance(failed.error, BackgroundSaveError) and "No space left" in str(failed.error)
    assert rec.of("committed") == []
    ckpt.close()


def test_quarantine_and_restore(tmp_path: Path) -> None:
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.step(state, epoch=1, step=10)
        newest = ckpt.step(state, epoch=2, step=20)
    assert newest is not None
    data = tmp_path / newest.name / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x10
    data.write_bytes(bytes(raw))
    rec = Recorder()
    with Checkpointer(tmp_path, callbacks=[rec], quiet=True) as ckpt, pytest.warns(savegame.ResumeWarning):
        restored = ckpt.restore(_state())
    assert restored is not None and restored.name == "epoch=001-step=000010"
    assert rec.hooks == ["quarantined", "restored"]
    (quarantined,) = rec.of("quarantined")
    assert quarantined.name == newest.name and "hash" in quarantined.error.lower()
    assert quarantined.moved_to is not None and (tmp_path / quarantined.moved_to).is_dir()
    assert not (tmp_path / newest.name).exists()
    (info,) = rec.of("restored")
    assert (info.name, info.path, info.epoch, info.step) == (restored.name, restored.path, 1, 10)
    assert info.quarantined == (newest.name,) and info.seconds > 0


def test_a_preemption_save(tmp_path: Path) -> None:
    rec = Recorder()
    state = _state()
    with Checkpointer(tmp_path, every_n_epochs=10, save_on_signal=True, signal_action="continue",
                      callbacks=[rec]) as ckpt:  # fmt: skip
        ckpt.step(state, epoch=1, step=5)
        os.kill(os.getpid(), signal.SIGUSR1)
        result = ckpt.step(state, epoch=1, step=6, epoch_end=False)
    assert result is not None
    (info,) = rec.of("preemption")
    assert (info.signal, info.name, info.path) == ("SIGUSR1", result.name, result.path)
    assert info.since_signal is not None and info.since_signal >= info.save_seconds > 0
    assert rec.hooks == ["started", "committed", "preemption"]
    assert savegame.read_manifest(result.path).metadata["preempted_by"] == "SIGUSR1"


# --------------------------------------------------------------------------------------------------
# Failing callbacks, the log line, checking callbacks


class Broken:
    def on_save_started(self, info: SaveStartedInfo) -> None:
        raise RuntimeError("tracking server down")

    def on_save_committed(self, info: SaveCommittedInfo) -> None:
        raise ValueError("bad metric")


def test_a_raising_callback_is_logged_and_ignored_and_the_checkpoint_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    state = _state()
    caplog.set_level(logging.INFO)
    with Checkpointer(tmp_path, callbacks=[Broken(), rec]) as ckpt:
        result = ckpt.save(state, epoch=1, step=3)
        failures = ckpt.callback_failures
    assert [(f.hook, type(f.error).__name__) for f in failures] == [
        ("on_save_started", "RuntimeError"), ("on_save_committed", "ValueError")]
    assert [c.name for c in rec.of("committed")] == [result.name]  # the next callback still got it
    assert savegame.verify(result.path)  # the checkpoint is there and intact
    savegame.load(result.path, _state())
    errors = [r for r in caplog.records if r.name == "savegame.events" and r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "Broken.on_save_started raised" in errors[0].getMessage()
    assert "tracking server down" in errors[0].getMessage()
    assert errors[1].exc_info is not None and errors[1].exc_info[0] is ValueError


def test_the_log_line_has_the_same_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    caplog.set_level(logging.INFO, logger="savegame.run.checkpointer")
    with Checkpointer(tmp_path, keep_last=1, callbacks=[rec]) as ckpt:
        ckpt.save(_state(), epoch=1)
        ckpt.save(_state(), epoch=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "savegame.run.checkpointer"]
    for info in rec.of("committed"):
        expected = (f"saved checkpoint {info.path}: {info.bytes} bytes, training blocked "
                    f"{info.blocking_seconds:.3f} s, durable after {info.durable_seconds:.3f} s "
                    f"({info.throughput / 1e6:.1f} MB/s)")  # fmt: skip
        assert expected in lines
    assert "retention deleted checkpoint epoch=001" in lines


def test_callbacks_are_checked(tmp_path: Path) -> None:
    class Typo:
        def on_save_commited(self, info: object) -> None: ...

    with pytest.raises(ConfigError, match="Typo defines none of the hooks on_save_started"):
        Checkpointer(tmp_path, callbacks=[Typo()])
    with pytest.raises(ConfigError, match="callbacks must be a list"):
        Checkpointer(tmp_path, callbacks=Recorder())  # type: ignore[arg-type]
    with Checkpointer(tmp_path, callbacks=[Callback()]) as ckpt:  # the base class: every hook a no-op
        ckpt.save(_state(), epoch=1)


# --------------------------------------------------------------------------------------------------
# Resuming says so


def test_resuming_prints_one_line_on_stderr_unless_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        saved = ckpt.save(state, epoch=3, step=1200)
    capfd.readouterr()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(_state()) is not None
    assert capfd.readouterr().err == f"savegame: resumed from {saved.name} (epoch 3, step 1200)\n"
    with Checkpointer(tmp_path, quiet=True) as ckpt:
        assert ckpt.restore(_state()) is not None
    assert capfd.readouterr().err == ""
    with Checkpointer(tmp_path, restart="off") as ckpt:  # nothing resumed: nothing said
        assert ckpt.restore(_state()) is None
    assert capfd.readouterr().err == ""
    # a folder name from someone else's hands cannot drive the terminal
    os.rename(saved.path, tmp_path / "x\x1b[2Jy")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(_state()) is not None
    assert capfd.readouterr().err == "savegame: resumed from x\\x1b[2Jy (epoch 3, step 1200)\n"


# --------------------------------------------------------------------------------------------------
# The loggers, read back with each library's reader


def _train(root: Path, logger: object) -> Recorder:
    """Two sync saves (steps 10 and 20), a background one (step 30), then a resume (at step 30); no
    hook may have failed (a failure would only be logged)."""
    rec = Recorder()
    state = _state()
    failures = []
    with Checkpointer(root, callbacks=[logger, rec]) as ckpt:
        ckpt.save(state, epoch=1, step=10)
        ckpt.save(state, epoch=2, step=20)
    failures += ckpt.callback_failures
    with Checkpointer(root, callbacks=[logger, rec], background=True, quiet=True) as ckpt:
        ckpt.save(state, epoch=3, step=30)
    failures += ckpt.callback_failures
    with Checkpointer(root, callbacks=[logger, rec], quiet=True) as ckpt:
        ckpt.restore(_state())
    failures += ckpt.callback_failures
    assert [(f.hook, repr(f.error)) for f in failures] == []
    assert len(rec.of("committed")) == 3 and len(rec.of("restored")) == 1
    return rec


def _expected(rec: Recorder) -> dict[str, list[tuple[int, float]]]:
    """Metric name -> [(step, value)] the loggers must have written."""
    out: dict[str, list[tuple[int, float]]] = {}
    for info in rec.of("committed"):
        for key, value in save_metrics(info).items():
            out.setdefault(key, []).append((info.step, value))
    restored = rec.of("restored")[0]
    out["savegame/restore_seconds"] = [(restored.step, restored.seconds)]
    return out


def _assert_logged(logged: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]],
                   rel: float) -> None:  # fmt: skip
    assert set(logged) >= set(expected), sorted(logged)
    for key, points in expected.items():
        assert [s for s, _ in logged[key]] == [s for s, _ in points], key
        assert [v for _, v in logged[key]] == pytest.approx([v for _, v in points], rel=rel), key


@pytest.mark.slow
def test_tensorboard_logger(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb")
    rec = _train(tmp_path / "run", logger)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    logged = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    _assert_logged(logged, _expected(rec), rel=1e-6)  # TensorBoard stores float32


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_logger_with_a_local_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a flag
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("savegame-events"))
    rec = _train(tmp_path / "run", MLflowLogger(run.info.run_id, tracking_uri=uri))
    expected = _expected(rec)
    logged = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                       key=lambda m: (m.step, m.timestamp))]
              for key in expected}  # fmt: skip
    _assert_logged(logged, expected, rel=1e-12)


def _wandb_records(run_dir: str) -> list[Any]:
    """The records of an offline W&B run, read from its ``.wandb`` file: a LevelDB-style log (7-byte
    header, 32 KiB blocks of records: crc32, length, type) of ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def _wandb_history(run_dir: str) -> list[dict[str, Any]]:
    """The history rows of a finished offline run. wandb-core (a separate process) may still be writing
    the file when ``finish()`` returns on a busy machine: wait for the run's ``exit`` record."""
    deadline = time.monotonic() + 120
    records = _wandb_records(run_dir)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "the offline run file never got its exit record"
        time.sleep(0.2)
        records = _wandb_records(run_dir)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)  # wandb.init starts the wandb-core process
def test_wandb_logger_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", project="savegame-events", dir=str(tmp_path))
    try:
        rec = _train(tmp_path / "run", WandbLogger(run))
    finally:
        run.finish()
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    rows = _wandb_history(run_dir)
    logged: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("savegame/") and key != "savegame/step":
                logged.setdefault(key, []).append((row["savegame/step"], value))
    _assert_logged(logged, _expected(rec), rel=1e-12)


def test_a_missing_library_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for module in ("wandb", "mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'savegame\[wandb\]'"):
        WandbLogger()
    with pytest.raises(ConfigError, match=r"pip install 'savegame\[mlflow\]'"):
        MLflowLogger()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'savegame\[tensorboard\]'"):
        TensorBoardLogger("unused")
