"""A write killed between its fsync and its rename leaves ``.NAME.tmp-HOST-PID``; the next
process that writes into that folder removes it (its writer no longer runs), and never the
temp file of a live writer or of another host (a disk shared between machines)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from fpo.atomic import atomic_save_bytes, remove_stale_temp_files, temp_path
from fpo.testing import run_python


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_first_write_into_a_folder_removes_temp_files_of_killed_writers(tmp_path):
    host, dead, live = socket.gethostname(), dead_pid(), os.getppid()
    stale = [f".last.ckpt.tmp-{host}-{dead}", f".rank0-00003.arrow.tmp-{dead}"]  # and legacy
    kept = [
        f".rank1-00003.arrow.tmp-{host}-{live}",  # a live writer (another rank)
        f".last.ckpt.tmp-another-host-{dead}",  # another machine's writer on a shared disk
        ".hidden.tmp-notapid",
        "last.ckpt",
        "notes.tmp-1",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"half a file")

    atomic_save_bytes(tmp_path / "manifest.json", lambda f: f.write(b"{}"))

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "manifest.json"])
    assert (tmp_path / "last.ckpt").read_bytes() == b"half a file"


def test_a_writer_never_removes_its_own_temp_file(tmp_path):
    own = temp_path(tmp_path / "last.ckpt")
    assert own.name == f".last.ckpt.tmp-{socket.gethostname()}-{os.getpid()}"
    own.write_bytes(b"being written")
    assert remove_stale_temp_files(tmp_path) == []
    assert own.exists()


def test_the_temp_file_of_a_killed_write_is_removed_by_the_next_run(tmp_path: Path):
    """A real kill (SIGKILL at the rename of fpo.testing.faults), then a second process."""
    target = tmp_path / "data.bin"
    write = (
        "import sys; from pathlib import Path; from fpo.atomic import atomic_save_bytes; "
        "atomic_save_bytes(Path(sys.argv[1]), lambda f: f.write(b'x'))"
    )
    kill_at_rename = "from fpo.testing.faults import sigkill_at_atomic_replace as kill; kill(1); "
    killed = run_python("-c", kill_at_rename + write, str(target))
    assert killed.returncode == -9, killed.stderr
    (left,) = tmp_path.glob(".data.bin.tmp-*")
    assert not target.exists()

    again = run_python("-c", write, str(tmp_path / "other.bin"))
    assert again.returncode == 0, again.stderr
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.bin"]
