"""Cache writes: a failed write leaves the old entry, and processes that would write one entry take turns."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from jetspec_compile.io import atomic_file, atomic_folder, file_lock


def test_a_failed_write_leaves_the_old_file_and_folder(tmp_path):
    path, folder = tmp_path / "a.bin", tmp_path / "ckpt"
    path.write_text("old")
    folder.mkdir()
    (folder / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and (folder / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "ckpt"], "no temporary left behind"
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text("new")
    assert (folder / "config.json").read_text() == "new"


def _hold(lock, log, name):
    with file_lock(lock):
        with open(log, "a") as fh:
            fh.write(f"{name} in\n")
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write(f"{name} out\n")


def test_file_lock_lets_one_process_in_at_a_time(tmp_path):
    lock, log = tmp_path / ".entry.lock", tmp_path / "log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hold, args=(lock, log, n)) for n in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().split()
    # each holder's "in" is followed by its own "out" before the other gets in
    assert len(lines) == 8 and lines[0::4] == lines[2::4] and lines[1::4] == ["in", "in"]
