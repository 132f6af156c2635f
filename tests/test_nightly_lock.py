"""The nightly run lock: one run at a time, stale holders detected (dead pid, leftover child holding the flock)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipelines.nightly import LockBusy, RunLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_for(path: str, timeout: float = 20.0) -> None:
    t = time.time()
    while not os.path.exists(path):
        if time.time() - t > timeout:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def test_second_holder_is_refused_and_sees_the_holder(tmp_path):
    path = str(tmp_path / "nightly.lock")
    a = RunLock(path)
    a.acquire("run-a")
    try:
        with pytest.raises(LockBusy) as e:
            RunLock(path).acquire("run-b")
        assert e.value.holder["pid"] == os.getpid()
        assert e.value.holder["run_id"] == "run-a"
        assert "another nightly run holds the lock" in str(e.value)
        a.heartbeat("embed")
        assert RunLock.read_holder(path)["stage"] == "embed"
    finally:
        a.release()
    b = RunLock(path)
    info = b.acquire("run-b")
    assert info["stale_previous_holder"] is None  # released cleanly: nothing stale to report
    b.release()
    assert RunLock.read_holder(path)["released"] is True


def test_heartbeat_thread_keeps_the_record_fresh(tmp_path):
    path = str(tmp_path / "nightly.lock")
    lk = RunLock(path)
    lk.acquire("long-run")
    first = RunLock.read_holder(path)["heartbeat_unix"]
    lk.start_heartbeat(every_s=0.05)
    try:
        deadline = time.time() + 10
        while RunLock.read_holder(path)["heartbeat_unix"] <= first:
            assert time.time() < deadline, "no heartbeat within 10 s"
            time.sleep(0.05)
    finally:
        lk.release()
    rec = RunLock.read_holder(path)
    assert rec["released"] is True and rec["stage"] == "lock"


def _holder_script(lock: str, pidfile: str, fork_child: bool) -> str:
    return textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {REPO!r})
        from pipelines.nightly import RunLock
        lk = RunLock({lock!r})
        lk.acquire("crashed-run")
        lk.heartbeat("embed")
        child = 0
        if {fork_child!r}:
            child = os.fork()
            if child == 0:          # a leftover worker that inherited the locked descriptor
                time.sleep(120)
                os._exit(0)
        with open({pidfile!r} + ".tmp", "w") as f:
            f.write(f"{{os.getpid()}} {{child}}")
        os.replace({pidfile!r} + ".tmp", {pidfile!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)


def test_holder_killed_with_sigkill_is_reported_as_stale(tmp_path):
    lock, pidfile = str(tmp_path / "nightly.lock"), str(tmp_path / "pids")
    p = subprocess.run([sys.executable, "-c", _holder_script(lock, pidfile, False)], timeout=60)
    assert p.returncode == -signal.SIGKILL
    dead_pid = int(open(pidfile).read().split()[0])
    lk = RunLock(lock)
    info = lk.acquire("next-run")
    try:
        assert info["stale_previous_holder"]["pid"] == dead_pid
        assert info["stale_previous_holder"]["stage"] == "embed"
        assert any("ended without releasing the lock" in n for n in info["notes"])
    finally:
        lk.release()


def test_stale_holder_whose_child_still_holds_the_flock_is_broken(tmp_path):
    lock, pidfile = str(tmp_path / "nightly.lock"), str(tmp_path / "pids")
    proc = subprocess.Popen([sys.executable, "-c", _holder_script(lock, pidfile, True)])
    child = 0
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
        dead_pid, child = (int(x) for x in open(pidfile).read().split())
        assert child > 0 and os.path.exists(f"/proc/{child}")
        # the kernel did not release the flock: the orphaned child still holds it
        import fcntl

        fd = os.open(lock, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        lk = RunLock(lock)
        info = lk.acquire("next-run")
        try:
            assert any("stale lock broken" in n and str(dead_pid) in n for n in info["notes"]), info
            assert RunLock.read_holder(lock)["pid"] == os.getpid()
            # and a third run is refused while we hold it (the broken lock did not leave two holders)
            with pytest.raises(LockBusy):
                RunLock(lock).acquire("third")
        finally:
            lk.release()
    finally:
        if child:
            os.kill(child, signal.SIGKILL)


def test_live_holder_on_another_host_is_busy_until_its_heartbeat_is_old(tmp_path):
    """A record from another host cannot be checked by pid: only a heartbeat older than stale_after_s breaks it."""
    import fcntl

    path = str(tmp_path / "nightly.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held (as if by a process on another host sharing the FS)
    rec = {"pid": 1, "host": "other-host.example", "run_id": "r", "started_at": "x", "heartbeat_unix": time.time(),
           "released": False}
    os.write(fd, json.dumps(rec).encode())
    try:
        with pytest.raises(LockBusy):
            RunLock(path, stale_after_s=3600).acquire("mine")
        rec["heartbeat_unix"] = time.time() - 7200
        os.lseek(fd, 0, 0)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(rec).encode())
        lk = RunLock(path, stale_after_s=3600)
        info = lk.acquire("mine")
        assert any("no heartbeat" in n for n in info["notes"])
        lk.release()
    finally:
        os.close(fd)
