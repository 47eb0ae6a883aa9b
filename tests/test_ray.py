"""savegame.ray with the real Ray Train: a TorchTrainer on 2 CPU workers killed, damaged and resumed.

The scenarios run ``examples/ray_train.py`` (the documented example) in subprocesses, each with its own
local Ray instance (``ray.init(num_cpus=2)``, no dashboard) whose temporary directory is a short folder
under /tmp made for this module (Ray's unix socket paths must stay under ~107 characters, pytest's
``tmp_path`` is too long) and whose storage path is under ``tmp_path``:

* ``reference``: an uninterrupted run;
* ``resumed``: the same run killed with SIGKILL once two checkpoints are registered (the driver's process
  group and, by pid, every process of its Ray session: Ray's workers have process groups of their own),
  a byte of the newest registered checkpoint flipped, and the same command run again (Ray Train v2's
  resume: the same ``RunConfig(name, storage_path)``; ``TorchTrainer.restore`` and
  ``resume_from_checkpoint`` raise in Ray 2.60).

Three Ray sessions in all (Ray start-up takes 10-60 s on a busy machine). The cases without Ray
sessions use ``ray.train.Checkpoint.from_directory`` directly.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors import safe_open

import savegame
from savegame.errors import ConfigError, HashMismatchError, NotACheckpointError, StateMismatchError

train = pytest.importorskip("ray.train")
import savegame.ray  # noqa: E402  (after the skip: it needs Ray only when called, the tests need it)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ray_train.py"
EPOCHS, KEEP = 5, 2
RUN_TIMEOUT = 480
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray's own run state (JSON), not ours
RAY_FILES = {SNAPSHOT, ".validate_storage_marker"}

pytestmark = [pytest.mark.subprocess]


# ---------------------------------------------------------------------------------------------------
# Running the example


@dataclass(frozen=True)
class Run:
    """One run of the example: its storage, the summary it wrote and every epoch's metrics."""

    storage: Path
    name: str
    summary: dict[str, Any]
    epochs: list[dict[str, Any]]
    output: str
    leftovers: tuple[str, ...]  # Ray processes still alive 30 s after the example returned

    @property
    def dir(self) -> Path:
        return self.storage / self.name

    def checkpoints(self) -> dict[int, Path]:
        """The checkpoints on disk, by the epoch their savegame manifest records."""
        return {_epoch(p): p for p in self.dir.iterdir() if p.is_dir()}


def _epoch(checkpoint: Path) -> int:
    return int(savegame.read_manifest(checkpoint).metadata[savegame.ray.MARKER]["metrics"]["epoch"])


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[str]:
    """RAY_TMPDIR for this module's sessions; every Ray process still using it is killed at the end."""
    short = tempfile.mkdtemp(prefix="sgray-", dir="/tmp")
    try:
        yield short
    finally:
        for proc in _ray_processes(short):
            proc.kill()
        shutil.rmtree(short, ignore_errors=True)


def _ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """Live processes of the Ray sessions under ``ray_tmp``: the driver and every process Ray started
    for it inherit ``RAY_TMPDIR`` (Ray's workers rename themselves ``ray::...``, so their command line
    does not say)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and (
                proc.environ().get("RAY_TMPDIR") == ray_tmp or any(ray_tmp in part for part in proc.cmdline())
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _env(ray_tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.update(RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", TORCHDYNAMO_DISABLE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _start(out: Path, ray_tmp: str, storage: Path, name: str, *extra: str) -> subprocess.Popen[bytes]:
    """Start the example in its own process group (so that a kill reaches every Ray process it starts)."""
    out.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, str(EXAMPLE), "--storage-path", str(storage), "--name", name, "--epochs", str(EPOCHS),
        "--keep", str(KEEP), "--order", "max", "--result", str(out / "result.json"),
        "--metrics-log", str(out / "epochs.jsonl"), *extra,
    ]  # fmt: skip
    with open(out / "output.log", "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(ray_tmp), cwd=str(ROOT),
                                start_new_session=True)  # fmt: skip


def _wait_until_gone(ray_tmp: str, *, seconds: float) -> list[str]:
    """Wait for the session's processes to end; the ones still alive after ``seconds`` (then killed)."""
    deadline = time.monotonic() + seconds
    while (alive := _ray_processes(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.25)
    names = []
    for p in alive:
        try:
            names.append(" ".join(p.cmdline()[:3]))
            p.kill()
        except psutil.Error:
            continue
    return names


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def _kill_session(proc: subprocess.Popen[bytes], ray_tmp: str) -> None:
    """SIGKILL the driver, its process group and every process of its Ray session at once: the machine
    died. (The driver's process group is not enough: Ray gives each worker a process group of its own,
    and a worker notices the loss of its raylet only seconds later, training on meanwhile.)"""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in _ray_processes(ray_tmp):
        try:
            p.kill()
        except psutil.Error:
            continue
    proc.wait(timeout=30)


def _finish(proc: subprocess.Popen[bytes], out: Path, storage: Path, name: str, ray_tmp: str) -> Run:
    """Wait for a run to end by itself; its Run (the test fails with its output if it did not succeed)."""
    leftovers = ["(the run timed out)"]
    try:
        proc.wait(timeout=RUN_TIMEOUT)
        leftovers = _wait_until_gone(ray_tmp, seconds=30)  # after ray.shutdown(), before any kill
    finally:
        _kill_session(proc, ray_tmp)  # whatever happened
    output = (out / "output.log").read_text(errors="replace")
    assert proc.returncode == 0, f"the example failed ({proc.returncode}):\n{output[-8000:]}"
    summary = json.loads((out / "result.json").read_text())
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    return Run(storage, name, summary, epochs, output, tuple(leftovers))


def _registered(run_dir: Path) -> dict[str, Any] | None:
    """Ray's run snapshot (the checkpoints it registered), or None while it is absent or half written."""
    try:
        return dict(json.loads((run_dir / SNAPSHOT).read_text()))
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, ray_tmp: str) -> Run:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    return _finish(_start(out, ray_tmp, out / "storage", "run"), out, out / "storage", "run", ray_tmp)


@dataclass(frozen=True)
class Resumed:
    run: Run
    killed: dict[str, Any]  # Ray's snapshot when the driver was killed
    killed_epochs: list[dict[str, Any]]
    flipped: Path
    killed_latest: int  # the epoch of the newest registered checkpoint when the run was killed
    expected_start: int


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory, ray_tmp: str) -> Resumed:
    """Kill a run mid-epoch, flip a byte in its newest checkpoint, run it again."""
    out = tmp_path_factory.mktemp("resumed")
    storage = out / "storage"
    proc = _start(out / "killed", ray_tmp, storage, "run", "--step-sleep", "0.12")
    deadline = time.monotonic() + RUN_TIMEOUT
    snapshot = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            snapshot = _registered(storage / "run")
            if snapshot and len(snapshot["checkpoint_results"]) >= 2:
                time.sleep(0.5)  # into the next epoch's steps
                break
            time.sleep(0.2)
        alive = [_name(p) for p in _ray_processes(ray_tmp)]
    finally:
        _kill_session(proc, ray_tmp)
    output = (out / "killed" / "output.log").read_text(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{output[-6000:]}"
    # the kill reached the training workers too (a check that could not see them would pass vacuously)
    assert any("RayTrainWorker" in name for name in alive), alive
    assert _wait_until_gone(ray_tmp, seconds=30) == []
    snapshot = _registered(storage / "run")  # read once nothing can write it any more
    assert snapshot is not None and len(snapshot["checkpoint_results"]) >= 2, output[-6000:]

    newest = storage / "run" / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert _epoch(newest) < EPOCHS, "the run was not killed in the middle of training"
    kept = [storage / "run" / r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    expected_start = max(_epoch(p) for p in kept if p != newest)
    killed_latest = _epoch(newest)
    _flip(newest)  # a flipped byte in the tensor data of the newest checkpoint
    with pytest.raises(HashMismatchError):  # (Ray's retention deletes it later in the resumed run)
        savegame.verify(newest)
    killed_epochs = [json.loads(line) for line in (out / "killed" / "epochs.jsonl").read_text().splitlines()]

    run = _finish(_start(out / "again", ray_tmp, storage, "run"), out / "again", storage, "run", ray_tmp)
    return Resumed(run, snapshot, killed_epochs, newest, killed_latest, expected_start)


def _flip(checkpoint: Path) -> None:
    """Flip bits of the last byte of a checkpoint's model tensor data."""
    data = checkpoint / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10
    data.write_bytes(bytes(raw))


def _same(a: Any, b: Any, where: str = "") -> list[str]:
    """Differences between two loaded states (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in _same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}.{i}")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


# ---------------------------------------------------------------------------------------------------
# Kill, damage, resume


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 120)
def test_killed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(reference: Run, resumed: Resumed) -> None:
    ref = savegame.load(reference.summary["final_checkpoint"])
    again = savegame.load(resumed.run.summary["final_checkpoint"])
    assert reference.summary["metrics"]["epoch"] == resumed.run.summary["metrics"]["epoch"] == EPOCHS
    assert set(ref) == {"model", "optimizer", "scheduler", "epoch"}
    assert _same(ref, again) == []
    # and the resume did not quietly start over: it began after the newest intact checkpoint
    assert resumed.run.epochs[0]["start_epoch"] == resumed.expected_start > 0
    assert [e["epoch"] for e in resumed.run.epochs] == list(range(resumed.expected_start + 1, EPOCHS + 1))


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 120)
def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_to_the_previous_one(resumed: Resumed) -> None:
    assert "ResumeWarning" in resumed.run.output and resumed.flipped.name in resumed.run.output
    assert f"at epoch {resumed.expected_start}" in resumed.run.output


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 120)
def test_the_example_leaves_no_ray_process_behind(reference: Run, resumed: Resumed) -> None:
    assert reference.leftovers == resumed.run.leftovers == ()


def _expected_kept(epochs: list[dict[str, Any]]) -> set[int]:
    """What CheckpointConfig(num_to_keep=KEEP, checkpoint_score_attribute="val_loss", order "max") keeps:
    the KEEP best by val_loss and the newest (ties: the later report ranks higher, as in Ray)."""
    ranked = sorted(epochs, key=lambda e: (e["val_loss"], e["epoch"]), reverse=True)
    return {e["epoch"] for e in ranked[:KEEP]} | {epochs[-1]["epoch"]}


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_ray_retention_keeps_the_best_by_score(reference: Run) -> None:
    # "max" ranks the highest val_loss best: with a falling loss that is the oldest checkpoint, the one a
    # recency rule would delete first ("min" would make the best the newest, kept anyway).
    assert [e["epoch"] for e in reference.epochs] == list(range(1, EPOCHS + 1))
    kept = reference.checkpoints()
    assert set(kept) == _expected_kept(reference.epochs)
    best = max(reference.epochs, key=lambda e: e["val_loss"])["epoch"]
    assert best != EPOCHS and best in kept
    savegame.verify(kept[best])
    top = sorted(reference.epochs, key=lambda e: (e["val_loss"], e["epoch"]), reverse=True)[:KEEP]
    assert {Path(p).name for p, _ in reference.summary["best_checkpoints"]} == {kept[e["epoch"]].name for e in top}


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 120)
def test_retention_across_the_resume_keeps_the_best(resumed: Resumed) -> None:
    final = _registered(resumed.run.dir)
    assert final is not None
    registered = {_epoch(resumed.run.dir / r["checkpoint_dir_name"]) for r in final["checkpoint_results"]}
    scores = {e["epoch"]: e["val_loss"] for e in resumed.killed_epochs + resumed.run.epochs}
    best = max(scores, key=lambda k: scores[k])
    assert best in registered and EPOCHS in registered and len(registered) <= KEEP + 1
    savegame.verify(resumed.run.checkpoints()[best])
    # A directory Ray had copied but not registered when the run died stays, unregistered: Ray neither
    # resumes from nor deletes it (nothing of the user's is deleted behind its back)
    killed_latest = resumed.killed_latest
    orphans = {e for e, p in resumed.run.checkpoints().items() if p.name not in {
        r["checkpoint_dir_name"] for r in final["checkpoint_results"]}}
    assert all(e > killed_latest for e in orphans), (orphans, killed_latest)


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 120)
def test_no_file_savegame_wrote_is_a_pickle(reference: Run, resumed: Resumed) -> None:
    for run in (reference, resumed.run):
        for path in sorted(run.dir.rglob("*")):
            if path.is_dir():
                continue
            head = path.read_bytes()[:2]
            assert not head.startswith(b"\x80"), f"{path} looks like a pickle"
            if path.name in RAY_FILES:  # Ray's own run state: JSON or empty
                assert path.stat().st_size == 0 or json.loads(path.read_text()) is not None
                continue
            assert path.parent.parent == run.dir, path  # ours: the files of a checkpoint directory
            if path.name == "manifest.json":
                assert savegame.read_manifest(path.parent).metadata[savegame.ray.MARKER]
                continue
            assert path.suffix == ".safetensors", path
            with safe_open(str(path), framework="pt") as opened:
                assert list(opened.keys())


# ---------------------------------------------------------------------------------------------------
# A checkpoint given explicitly (no Ray session needed)


def _fresh_state() -> dict[str, Any]:
    torch.manual_seed(123)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    return {"model": net, "optimizer": opt, "scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), "epoch": 0}


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_restore_an_explicit_checkpoint_without_unpickling(reference: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, _forbidden)
    monkeypatch.setattr(torch, "load", _forbidden)
    state = _fresh_state()
    final = reference.summary["final_checkpoint"]
    restored = savegame.ray.restore(state, checkpoint=train.Checkpoint.from_directory(final))
    assert restored is not None and restored.path == final and state["epoch"] == EPOCHS
    assert restored.metrics["epoch"] == EPOCHS
    assert restored.metrics["val_loss"] == reference.summary["metrics"]["val_loss"]
    saved = savegame.load(final)["model"]
    assert all(torch.equal(saved[k], v) for k, v in state["model"].state_dict().items())


def _forbidden(*args: object, **kwargs: object) -> None:
    raise AssertionError("an unpickler was called")


def test_a_torch_save_checkpoint_is_refused_with_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint_2026"
    folder.mkdir()
    torch.save({"model": _fresh_state()["model"].state_dict()}, folder / "model.pt")  # what a Ray example writes
    state = _fresh_state()
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    with pytest.raises(NotACheckpointError, match=r"not a savegame checkpoint.*model\.pt.*savegame\.ray\.report"):
        savegame.ray.restore(state, checkpoint=train.Checkpoint.from_directory(str(folder)))
    assert all(torch.equal(before[k], v) for k, v in state["model"].state_dict().items())


def test_a_damaged_explicit_checkpoint_is_refused_and_the_state_untouched(tmp_path: Path) -> None:
    state = _fresh_state()
    savegame.save(tmp_path / "c", state)
    _flip(tmp_path / "c")
    target = _fresh_state()
    with torch.no_grad():
        for p in target["model"].parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in target["model"].state_dict().items()}
    with pytest.raises(HashMismatchError, match=r"model\.safetensors"):
        savegame.ray.restore(target, checkpoint=train.Checkpoint.from_directory(str(tmp_path / "c")))
    assert all(torch.equal(before[k], v) for k, v in target["model"].state_dict().items())


def test_a_checkpoint_of_other_items_says_it_was_not_written_by_report(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"weights": _fresh_state()["model"]})  # e.g. another integration's layout
    with pytest.raises(StateMismatchError, match=r"not written by savegame\.ray\.report.*\['weights'\]"):
        savegame.ray.restore(_fresh_state(), checkpoint=train.Checkpoint.from_directory(str(tmp_path / "c")))


@pytest.mark.parametrize(
    ("metrics", "state", "metadata", "named"),
    [(["loss"], {}, None, "metrics must be a dict, not list"), (None, {}, None, "metrics must be a dict, not NoneType"),
     (0.5, {}, None, "metrics must be a dict, not float"), ({"loss": 0.5}, [1], None, "state must be a dict, not list"),
     ({"loss": 0.5}, {}, ["x"], "metadata must be a dict"), ({1: 0.5}, {}, None, "keys must be str")],
)
def test_report_refuses_arguments_that_are_not_mappings(metrics: Any, state: Any, metadata: Any, named: str) -> None:
    # checked on every rank before Ray is asked anything (no worker context needed): a ConfigError naming the
    # argument, not an AttributeError / TypeError from deep inside
    with pytest.raises(ConfigError, match=re.escape(named)):
        savegame.ray.report(metrics, state, metadata=metadata)


def test_a_report_without_the_score_attribute_is_refused() -> None:
    check = savegame.ray._check_score_attribute
    check({"val": {"loss": 0.5}}, "val/loss")  # nested metrics are flattened with "/" as Ray does
    with pytest.raises(ConfigError, match=r"metrics\['val_loss'\] is missing.*could delete it even if it is the best"):
        check({"loss": 0.5}, "val_loss")
    with pytest.raises(ConfigError, match="str"):
        check({"val_loss": "0.5"}, "val_loss")
    check({"loss": 0.5}, None)


def test_the_internal_context_the_checks_read_exists_in_this_ray() -> None:
    # The score and name checks read Ray Train v2's internal worker context; were it renamed, they would be
    # skipped silently, so this pins the fields they use (no session needed to look at the classes).
    import inspect
    from dataclasses import fields

    from ray.train.v2._internal.execution import context

    assert callable(context.get_train_context)
    assert {"train_run_context", "storage_context"} <= {f.name for f in fields(context.TrainContext)}
    assert "run_config" in {f.name for f in fields(context.TrainRunContext)}
    storage = context.StorageContext
    assert hasattr(storage, "build_checkpoint_path_from_name")
    assert "self.storage_filesystem," in inspect.getsource(storage.__init__)


@pytest.mark.timeout(120)
def test_savegame_imports_without_ray_and_says_how_to_get_it() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import savegame, savegame.ray\n"
        "from savegame.errors import ConfigError\n"
        "try:\n    savegame.ray.restore({})\nexcept ConfigError as exc:\n    print('HINT', exc)\n"
        "print('RAY', 'ray.train' in sys.modules)\n"
    )
    env = _env("/nonexistent")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "HINT savegame.ray needs Ray Train" in proc.stdout and "pip install 'savegame[ray]'" in proc.stdout
    assert "RAY False" in proc.stdout
    lazy = subprocess.run([sys.executable, "-c", "import sys, savegame, savegame.ray; print('ray' in sys.modules)"],
                          capture_output=True, text=True, env=env, timeout=110)  # fmt: skip
    assert lazy.stdout.strip() == "False", lazy.stderr


def _saved_checkpoints(tmp_path: Path, count: int) -> list[Path]:
    """``count`` savegame checkpoints of a model at successive epochs, oldest first (distinct commit times)."""
    state = _fresh_state()
    paths = []
    for epoch in range(1, count + 1):
        with torch.no_grad():
            next(state["model"].parameters()).add_(1.0)
        state["epoch"] = epoch
        paths.append(tmp_path / f"checkpoint_{epoch}")
        savegame.save(paths[-1], state, metadata={savegame.ray.MARKER: {"metrics": {"epoch": epoch}}})
        time.sleep(0.01)
    return paths


def _as_in_a_worker(monkeypatch: pytest.MonkeyPatch, newest: Path, kept_in_ray_order: list[Path]) -> None:
    """What ``get_checkpoint`` and ``get_all_reported_checkpoints`` answer inside a worker (they need a
    live Ray Train session, which the Ray runs above exercise): real Checkpoint objects, Ray's order."""
    reported = [
        train.ReportedCheckpoint(train.Checkpoint.from_directory(str(p)), {}, train.ReportedCheckpointStatus.COMMITTED)
        for p in kept_in_ray_order
    ]
    monkeypatch.setattr(train, "get_checkpoint", lambda: train.Checkpoint.from_directory(str(newest)))
    monkeypatch.setattr(train, "get_all_reported_checkpoints", lambda consistency_mode: reported)


def test_fallback_takes_the_newest_intact_checkpoint_not_rays_score_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third, fourth = _saved_checkpoints(tmp_path, 4)
    # Ray lists them ranked by a score, worst first: neither that order nor its reverse is the time order
    _as_in_a_worker(monkeypatch, fourth, [first, third, second, fourth])
    _flip(fourth)
    state = _fresh_state()
    with pytest.warns(savegame.ResumeWarning, match=rf"resumed from .*{third.name}.*skipped .*{fourth.name}"):
        restored = savegame.ray.restore(state)
    assert restored is not None and restored.path == str(third) and state["epoch"] == 3
    assert [Path(p).name for p, _ in restored.skipped] == [fourth.name]
    _flip(third)
    with pytest.warns(savegame.ResumeWarning):
        restored = savegame.ray.restore(state)
    assert restored is not None and restored.path == str(second) and state["epoch"] == 2
    assert [Path(p).name for p, _ in restored.skipped] == [fourth.name, third.name]


def test_no_intact_checkpoint_fails_naming_every_one_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _saved_checkpoints(tmp_path, 2)
    for p in paths:
        _flip(p)
    _as_in_a_worker(monkeypatch, paths[-1], paths)
    state = _fresh_state()
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    with pytest.raises(HashMismatchError, match="no intact savegame checkpoint") as caught:
        savegame.ray.restore(state)
    assert all(str(p) in str(caught.value) for p in paths) and "new RunConfig(name=...)" in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in state["model"].state_dict().items()) and state["epoch"] == 0


def test_a_foreign_older_checkpoint_is_skipped_and_named_like_a_damaged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray also keeps a checkpoint an earlier version of the training function wrote without savegame: the
    # fallback tries it last (it has no manifest to date it) and names it with the others, rather than
    # stopping at it with an error about that one checkpoint only
    paths = _saved_checkpoints(tmp_path, 2)
    foreign = tmp_path / "checkpoint_foreign"
    foreign.mkdir()
    (foreign / "model.pt").write_bytes(b"not ours")
    for p in paths:
        _flip(p)
    _as_in_a_worker(monkeypatch, paths[-1], [paths[0], foreign, paths[1]])
    with pytest.raises(HashMismatchError, match="no intact savegame checkpoint to resume from among the 3") as caught:
        savegame.ray.restore(_fresh_state())
    assert all(str(p) in str(caught.value) for p in [*paths, foreign])
    assert "not a savegame checkpoint" in str(caught.value)


def test_a_fresh_run_restores_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "get_checkpoint", lambda: None)
    assert savegame.ray.restore(_fresh_state()) is None


def test_a_checkpoint_dir_name_that_exists_in_storage_is_refused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.storage import StorageContext

    # the worker's internal context as Ray builds it, with Ray's real storage context of a run folder
    context = SimpleNamespace(storage_context=StorageContext(str(tmp_path), "run", read_only=True))
    (tmp_path / "run" / "epoch-3").mkdir(parents=True)
    savegame.ray._check_new_name("epoch-4", context)
    savegame.ray._check_new_name(None, context)
    with pytest.raises(savegame.OccupiedPathError, match=r"checkpoint_dir_name='epoch-3' already exists.*unique"):
        savegame.ray._check_new_name("epoch-3", context)


def test_restore_refuses_a_state_or_checkpoint_of_the_wrong_type(tmp_path: Path) -> None:
    """A path or a str as ``checkpoint`` raised a bare AttributeError ('as_directory'); ``state=None`` one
    after the whole checkpoint was loaded. Both are ConfigErrors saying what to pass, before any work."""
    import savegame.ray as sray

    for checkpoint in (str(tmp_path), tmp_path):
        with pytest.raises(ConfigError, match=r"checkpoint must be a ray\.train\.Checkpoint"):
            sray.restore({"x": torch.zeros(1)}, checkpoint=checkpoint)
    with pytest.raises(ConfigError, match="state must be a dict"):
        sray.restore(None, checkpoint=str(tmp_path))  # type: ignore[arg-type]
