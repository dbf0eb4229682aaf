"""The work folders of exports, and what killed exports leave of them.

An export builds everything in `.<name>.export-XXXXXXXX` inside its out folder and renames the
results into place; Ctrl-C, SIGTERM and SIGHUP clean up. A SIGKILL (the OOM killer, power loss)
can't: its folder, hundreds of MB, would stay for good. So each work folder carries an owner
record, and the next export into the same folder removes those whose owner is gone, never the
folder of an export that is still running there.
"""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.core.progress import say
from toolkit.core.units import MIB

# `create`'s folders: `.<name>.export-XXXXXXXX`.
WORK_GLOB = ".*.export-*"
OWNER_FILE = "owner.json"
# A work folder without an owner record this machine can check (one from a version before the
# records, one whose record was cut short, one written from another machine onto a shared disk)
# may still belong to a running export; only a day without any change inside shows it does not.
UNOWNED_MAX_AGE_S = 24 * 3600


def _read(path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, so the start time,
    field 22, is [19]); None when there is no such process. The name is cut at the *last* ")":
    it may itself hold spaces and parentheses."""
    text = _read(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split() if text and ")" in text else None


def owner_record(pid: int | None = None) -> dict:
    """What identifies process `pid` (this one by default) beyond its number, which the kernel
    hands out again: its start time (clock ticks after boot, Linux), and the machine, boot and
    PID namespace in which the number means that process."""
    import socket

    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"pid": pid, "start": stat[19] if stat and len(stat) > 19 else None, "host": socket.gethostname(),
            "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _owner_alive(record) -> bool | None:
    """Whether the export that wrote `record` is still running; None when this machine cannot
    tell (no usable record, another machine or container, no way to look at processes)."""
    if not isinstance(record, dict):
        return None
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    if pid <= 0:  # os.kill(0, ...) would address a whole process group
        return None
    here = owner_record()
    if record.get("host") != here["host"]:
        return None
    if record.get("boot") and here["boot"] and record["boot"] != here["boot"]:
        return False  # rebooted since: every process of that boot is gone
    if record.get("pidns") and here["pidns"] and record["pidns"] != here["pidns"]:
        return None  # another container's process numbers say nothing here
    if os.path.exists("/proc/self/stat"):
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):  # gone, or dead and not yet reaped
            return False
        # Same number, later start: the kernel gave the dead owner's number to another process.
        return not (record.get("start") and len(stat) > 19 and stat[19] != str(record["start"]))
    if os.name == "nt":  # os.kill there terminates the process instead of probing it
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return None
    return True


def create(out: Path, name: str) -> Path:
    """A fresh work folder for exporting `name` into `out`, marked as this process's (see
    `sweep_stale`)."""
    import json
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=f".{name}.export-", dir=out))
    (work / OWNER_FILE).write_text(json.dumps(owner_record()))
    return work


def _tree_usage(path: Path) -> tuple[int, float]:
    """Bytes on disk under `path` and the newest change time in it, without following links."""
    used, newest = 0, 0.0
    for dirpath, _, filenames in os.walk(path):  # os.walk does not enter linked folders
        for p in [dirpath] + [os.path.join(dirpath, n) for n in filenames]:
            try:
                st = os.lstat(p)
            except OSError:
                continue
            newest = max(newest, st.st_mtime)
            if p != dirpath:
                blocks = getattr(st, "st_blocks", None)  # what deleting frees, sparse files included
                used += st.st_size if blocks is None else blocks * 512
    return used, newest


def _remove_tree(path: Path) -> str | None:
    """rmtree `path` (it never follows links, and refuses a link at the top); the first error
    as text, or None. A folder another export's sweep removed first is no error."""
    import shutil
    import sys

    errors: list[str] = []

    def on_error(func, p, exc):
        exc = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(exc, FileNotFoundError):
            errors.append(f"{p}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc))

    try:
        shutil.rmtree(path, **({"onexc": on_error} if sys.version_info >= (3, 12) else {"onerror": on_error}))
    except OSError as exc:
        errors.append(exc.strerror or str(exc))
    return errors[0] if errors else None


def sweep_stale(out, progress=say, now: float | None = None,
                          max_age: float = UNOWNED_MAX_AGE_S) -> list[Path]:
    """Remove the work folders (`.*.export-*` directories, never links or anything else) that
    exports killed before their cleanup could run left in `out`; returns the removed paths.

    A folder whose owner record names a process that is gone is removed; one whose owner still
    runs (a concurrent export) is left alone; one without an owner record this machine can
    check is removed only when nothing in it changed for `max_age` seconds. One progress line
    says what was removed and how much it freed; a removal that fails is a warning line.
    """
    import fnmatch
    import json
    import time

    now = time.time() if now is None else now
    removed: list[Path] = []
    freed, n_unowned = 0, 0
    young: list[tuple[str, float]] = []
    try:
        entries = sorted(os.scandir(out), key=lambda e: e.name)
    except OSError:
        return removed
    for entry in entries:
        try:
            if not fnmatch.fnmatchcase(entry.name, WORK_GLOB) or not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        path = Path(entry.path)
        try:
            record = json.loads((path / OWNER_FILE).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            record = None
        alive = _owner_alive(record)
        if alive:
            continue
        used, newest = _tree_usage(path)
        if alive is None and now - newest < max_age:
            young.append((path.name, now - newest))
            continue
        error = _remove_tree(path)
        if error:
            progress(f"warning: could not remove the stale export folder {path}: {error}")
            continue
        removed.append(path)
        freed += used
        n_unowned += alive is None
    parts = []
    if removed:
        parts.append(f"removed {len(removed)} work folder{'s' * (len(removed) > 1)} left in {out} by killed "
                     f"exports: {', '.join(p.name for p in removed)} ({freed / MIB:.1f} MiB freed"
                     + (f"; {n_unowned} of them without an owner record, unchanged for over "
                        f"{max_age / 3600:g} h" if n_unowned else "") + ")")
    if young:
        parts.append(f"kept {', '.join(f'{n} (changed {a / 3600:.1f} h ago)' for n, a in young)}: no owner "
                     f"record this machine can check, so removed only once unchanged for {max_age / 3600:g} h")
    if parts:
        progress("; ".join(parts))
    return removed
