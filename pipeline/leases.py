"""Leases: one writer at a time for a model group, a codebook set or a results folder.

A lease is a small JSON record (owner, host, pid, command, heartbeat) created only if absent
(``O_CREAT | O_EXCL`` on a file system; on object storage a conditional put, ``If-None-Match:
*``, does the same), and renewed by a heartbeat thread while its holder works (on object
storage each renewal is conditional on the version it last wrote, ``If-Match``, so a holder
that was presumed dead and taken over notices and stops). A second writer is refused with a
message naming the holder. A lease whose holder is gone is taken over: its heartbeat is older
than the time to live, or its process is dead on this very host (so rerunning a killed command
at once works). Chunk-level claiming would let two runs share one group's work, but needs a
claim per chunk and its cleanup; a whole-group lease is one record, and a second run of the
same command has nothing to add while the first one lives.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import psutil

from .errors import LeaseHeldError
from .location import ObjectPath, as_location, is_local

LEASE_TTL_S = 60.0          # a heartbeat older than this frees the lease
HEARTBEAT_EVERY_S = 10.0


def leases_beside(path: str | Path | ObjectPath) -> Path | ObjectPath:
    """Where the leases of a store or results folder live: beside it (outside a Zarr
    hierarchy, and never part of what they guard)."""
    path = as_location(path)
    return path.parent / f"{path.name}.leases"


class Lease:
    """``with Lease(folder, name, what):`` hold the lease ``name`` in ``folder`` for the block."""

    def __init__(self, folder: str | Path | ObjectPath, name: str, what: str, *, wait: float = 0.0,
                 ttl: float = LEASE_TTL_S):
        self.path = as_location(folder) / f"{name.replace('/', '__')}.json"
        self._etag: str | None = None  # object storage: the version of the record we last wrote
        self.what, self.wait, self.ttl = what, wait, ttl
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"what": self.what, "owner": f"{getpass.getuser()}@{socket.gethostname()}",
                "host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:500],
                "token": self.token, "heartbeat": now}

    def _create(self) -> bool:
        """Write the record if no lease exists; False if one does. The record is written aside
        and hard-linked into place (create-if-absent, atomic), so no reader sees it half written;
        an object is put only if absent."""
        if not is_local(self.path):
            try:
                self._etag = self.path.write_bytes(json.dumps(self._record()).encode(), if_absent=True)
                return True
            except FileExistsError:
                return False
        for _ in range(5):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{self.token}.new")
            try:
                tmp.write_text(json.dumps(self._record()))
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:  # the folder was removed by a lease released just now
                continue
            finally:
                tmp.unlink(missing_ok=True)
        return False

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Remove a dead holder's lease so that ``_create`` can succeed. Only the process that
        creates the claim for that very record (by its token, ``O_EXCL``) removes it, so two
        takers never both win, and a live lease that replaced it is never touched. On object
        storage the record is replaced by ours only if it is still that version (True: the
        lease is ours)."""
        if not is_local(self.path):
            try:
                self._etag = self.path.write_bytes(json.dumps(self._record()).encode(), if_etag=stale["_etag"])
                return True
            except FileExistsError:
                return False
        claim = self.path.with_name(f".{self.path.name}.takeover-{stale.get('token')}")
        with contextlib.suppress(FileNotFoundError):
            if time.time() - claim.stat().st_mtime > self.ttl:
                claim.unlink()  # a taker that died while taking over
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False  # another process is taking it over
        try:
            current = self.holder()
            if current is not None and current.get("token") == stale.get("token"):
                self.path.unlink(missing_ok=True)
        finally:
            claim.unlink(missing_ok=True)
        return False

    def holder(self) -> dict[str, Any] | None:
        """The current record, or None if there is none (or it is being replaced). On object
        storage it carries its version as ``_etag``."""
        try:
            if is_local(self.path):
                return json.loads(self.path.read_text())
            data, etag = self.path.read_versioned()
            return {**json.loads(data), "_etag": etag}
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale(self, record: dict[str, Any]) -> bool:
        if time.time() - float(record.get("heartbeat", 0)) > self.ttl:
            return True
        return record.get("host") == socket.gethostname() and not psutil.pid_exists(int(record.get("pid", -1)))

    def acquire(self, wait: float | None = None) -> "Lease":
        """Take the lease; a live holder's is refused at once, or after ``wait`` seconds."""
        deadline = time.monotonic() + (self.wait if wait is None else wait)
        for _ in range(10):
            if self._create():
                self._start_heartbeat()
                return self
            record = self.holder()
            if record is None:
                time.sleep(0.05)
                continue  # released or taken over under us: try again
            if not self._stale(record) and time.monotonic() < deadline:
                time.sleep(0.2)
                return self.acquire(max(0.0, deadline - time.monotonic()))
            if not self._stale(record):
                age = time.time() - float(record.get("heartbeat", 0))
                raise LeaseHeldError(
                    f"{self.what} is being written by {record.get('owner')} (pid {record.get('pid')}, heartbeat "
                    f"{age:.0f} s ago, command: {record.get('command')}); wait for it to finish or stop it. A lease "
                    f"whose holder stops is taken over after {self.ttl:.0f} s ({self.path})")
            if self._take_over(record):
                self._start_heartbeat()
                return self
        raise LeaseHeldError(f"{self.what}: could not take the lease {self.path}; another writer is starting")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(min(HEARTBEAT_EVERY_S, self.ttl / 4)):
                if not is_local(self.path):
                    try:
                        self._etag = self.path.write_bytes(json.dumps(self._record()).encode(), if_etag=self._etag)
                    except FileExistsError:
                        return  # taken over (we were presumed dead): stop renewing
                    except Exception:  # noqa: BLE001  (a network error: try again at the next beat)
                        pass
                    continue
                record = self.holder()
                if record is None or record.get("token") != self.token:
                    return  # taken over (we were presumed dead): stop renewing someone else's lease
                tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
                with contextlib.suppress(OSError):  # a full disk: try again at the next beat
                    tmp.write_text(json.dumps(self._record()))
                    os.replace(tmp, self.path)

        self._thread = threading.Thread(target=beat, name=f"lease {self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = self.holder()
        if record is not None and record.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if not is_local(self.path):
            return
        with contextlib.suppress(OSError):  # the last lease out leaves no empty folder behind
            self.path.parent.rmdir()

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def leases(*held: Lease) -> Iterator[None]:
    """Hold several leases (taken in a fixed order, so two writers never wait on each other)."""
    with contextlib.ExitStack() as stack:
        for lease in sorted(held, key=lambda lease: str(lease.path)):
            stack.enter_context(lease)
        yield
