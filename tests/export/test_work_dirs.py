"""Sweeping the work folders that dead exports left behind (toolkit/export/work_dirs.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def _work_dir(out: Path, name: str, owner: dict | None = None, mib: int = 0) -> Path:
    """A work folder as an export makes it, with `owner` as its owner record and `mib` of data."""
    from toolkit.export.work_dirs import OWNER_FILE

    work = out / name
    (work / "hf").mkdir(parents=True)
    (work / "hf" / "model.safetensors").write_bytes(b"\0" * (mib * 1024**2))
    if owner is not None:
        (work / OWNER_FILE).write_text(json.dumps(owner))
    return work


def test_sweep_removes_what_a_dead_export_left_and_nothing_else(tmp_path):
    import os
    import sys

    from toolkit.export.work_dirs import owner_record, sweep_stale

    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead_owner = owner_record(dead.pid)  # read while it runs: its start time is in the record
        dead.wait()
        stale = _work_dir(out, ".m.export-dead0001", dead_owner, mib=3)
        mine = _work_dir(out, ".m.export-mine0001", owner_record())
        running = _work_dir(out, ".m.export-live0001", owner_record(sleeper.pid))
        unowned = _work_dir(out, ".old.export-young001")  # an older toolkit's, changed just now
        (out / ".cache").mkdir()  # not a work folder: never looked at
        _work_dir(out, "m.export-nodot", dead_owner)
        (out / ".m.export-file").write_text("a file, not a folder")
        target = _work_dir(tmp_path, ".m.export-target", dead_owner)
        (out / ".m.export-link").symlink_to(target, target_is_directory=True)

        lines = []
        assert sweep_stale(out, lines.append) == [stale]
        assert len(lines) == 1, lines
        assert ".m.export-dead0001" in lines[0] and "3.0 MiB freed" in lines[0], lines
        assert ".old.export-young001" in lines[0] and "24 h" in lines[0], lines
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [mine.name, running.name, unowned.name, ".cache", "m.export-nodot", ".m.export-file", ".m.export-link"])
        assert (target / "hf" / "model.safetensors").is_file()  # the link is not followed

        sleeper.kill()
        sleeper.wait()
        lines.clear()
        assert sweep_stale(out, lines.append) == [running]  # its owner is gone now
        assert mine.is_dir() and unowned.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    if os.path.exists("/proc/self/stat"):
        # The dead owner's number handed to a new process (here: ours) is not that owner.
        reused = _work_dir(out, ".m.export-reused01", {**owner_record(), "start": "1"})
        assert sweep_stale(out, lambda m: None) == [reused]


def test_sweep_removes_an_unowned_folder_only_after_a_day_unchanged(tmp_path):
    import os

    from toolkit.export.work_dirs import sweep_stale

    out = tmp_path / "out"
    old = _work_dir(out, ".m.export-old00001", mib=1)
    young = _work_dir(out, ".m.export-young001")
    foreign = _work_dir(out, ".m.export-foreign1", {"pid": os.getpid(), "host": "another-machine"})
    day_ago = time.time() - 25 * 3600
    for work in (old, foreign):
        for p in [*work.rglob("*"), work]:
            os.utime(p, (day_ago, day_ago))
    # A fresh file deep inside is a running export's: the folder's own mtime alone would miss it.
    os.utime(young, (day_ago, day_ago))
    os.utime(young / "hf", (day_ago, day_ago))

    lines = []
    assert sorted(sweep_stale(out, lines.append)) == sorted([old, foreign])
    assert len(lines) == 1 and "2 of them without an owner record, unchanged for over 24 h" in lines[0], lines
    assert "1.0 MiB freed" in lines[0] and "kept .m.export-young001" in lines[0], lines
    assert [p.name for p in out.iterdir()] == [young.name]
    lines.clear()
    assert sweep_stale(out, lines.append) == [] and len(lines) == 1  # still kept, still said
    assert sweep_stale(tmp_path / "missing", lines.append) == []


def test_sweep_failure_is_a_warning(tmp_path, monkeypatch):
    import shutil
    import socket

    from toolkit.export.work_dirs import sweep_stale

    out = tmp_path / "out"
    # Above Linux's largest pid (2**22): no such process, ever.
    stale = _work_dir(out, ".m.export-dead0001", {"pid": 2**22 + 1, "host": socket.gethostname()})

    def refuse(path, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    lines = []
    assert sweep_stale(out, lines.append) == []
    assert lines == [f"warning: could not remove the stale export folder {stale}: Permission denied"]
    assert stale.is_dir()
