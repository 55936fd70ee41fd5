"""The results store: one SQLite row per finished run, safe for several grid processes at once.

WAL mode and a busy timeout let readers and writers share one file; a `claims` row (owner,
lease expiry) per run keeps two processes from training the same run; a finished run is
INSERTed in one transaction together with the release of its claim, so a kill at any moment
leaves either no row or a whole row. A claim whose owner died on this host (its pid is gone, or
now belongs to a process started later), or whose lease ran out, may be taken over.

A database that fails SQLite's `PRAGMA quick_check` is refused before anything is written to it;
the message says how to rebuild it from the run folders.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flatmin.errors import FlatminError, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, method TEXT, dataset TEXT, model TEXT, augment TEXT, seed INTEGER,
    label TEXT, config TEXT NOT NULL, metrics TEXT NOT NULL, git_commit TEXT, versions TEXT,
    device TEXT, time_s REAL, run_dir TEXT, finished_at REAL, health TEXT);
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS selections (
    cell TEXT PRIMARY KEY, method TEXT, dataset TEXT, model TEXT, augment TEXT, chosen TEXT,
    metric TEXT, split TEXT, scores TEXT, made_at REAL);
"""
LEASE_S = 600.0
# Columns added after the first stores were written: (name, type). A writer adds what its file lacks;
# a reader of an older file gets None for them (run health: the tables then read the run's log).
ADDED_COLUMNS = (("health", "TEXT"),)


def _start_time(pid: int) -> str:
    """When a process started (clock ticks since boot, Linux), so a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22: starttime


def owner_id() -> str:
    """host:pid@start of this process, so a dead owner on the same host can be recognised."""
    pid = os.getpid()
    start = _start_time(pid)
    return f"{socket.gethostname()}:{pid}" + (f"@{start}" if start else "")


def _owner_dead(owner: str) -> bool:
    """True when the claim's owner was a process on this host that no longer runs."""
    host, _, rest = owner.rpartition(":")
    pid, _, start = rest.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host: only its lease can expire
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return bool(start) and _start_time(int(pid)) not in ("", start)  # the pid now names another process


def rebuild_hint(path: Path) -> str:
    """How to get a usable store back: every finished run still has its folder and metrics.json."""
    return (f"rebuild it: mv {path} {path}.damaged, then re-run the flatmin compare/grid command that "
            "filled it (finished runs are read back from their run folders, nothing is retrained)")


INSERTED = ("key", "method", "dataset", "model", "augment", "seed", "label", "config", "metrics",
            "git_commit", "versions", "device", "time_s", "run_dir", "finished_at", "health")
INSERT = f"INSERT OR IGNORE INTO runs ({', '.join(INSERTED)}) VALUES ({', '.join('?' * len(INSERTED))})"
RUN_COLUMNS = ("key", "config", "metrics", "label")  # what a table must have to be flatmin's runs
SQLITE_MAGIC = b"SQLite format 3\x00"


def _read_only_uri(path: Path) -> str:
    """With no WAL beside it, nobody has the file open: read it as immutable (not even SQLite's
    -wal/-shm side files are created); else read-only beside the writer's WAL."""
    quiet = not Path(f"{path}-wal").exists()
    return path.resolve().as_uri() + ("?immutable=1" if quiet else "?mode=ro")


class Store:
    """A results database; every method opens its own short transaction.

    ``read_only`` (what `report` and `calibration` use): the file must already be a flatmin store,
    and it is opened so that SQLite cannot write to it. A writer creates flatmin's tables only in a
    new file (or a 0-byte or table-less one); a database holding other tables is refused untouched.
    """

    def __init__(self, path: str | Path, lease_s: float = LEASE_S, *, read_only: bool = False) -> None:
        self.path, self.lease_s, self.owner, self.read_only = Path(path), lease_s, owner_id(), read_only
        if self.path.is_dir():
            raise FlatminError(f"{self.path} is a folder, not a results database")
        if read_only:
            self._open_read_only()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._check()
            self.db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self._setup()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} is not a usable results database ({err}); nothing was written "
                             f"to it; {rebuild_hint(self.path)}") from None

    def _open_read_only(self) -> None:
        """Open an existing flatmin store for reading; anything else is one error, the file unchanged."""
        what = "flatmin compare and flatmin grid write one (results.db in their --out)"
        if not self.path.is_file():
            raise FlatminError(f"no results database at {self.path}; {what}")
        with open(self.path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if not head:
            raise FlatminError(f"{self.path} is an empty file, not a results database; {what}")
        if head != SQLITE_MAGIC:
            raise FlatminError(f"{self.path} is not an SQLite database, so not a results database; {what}")
        try:
            self._check()
            self.db = sqlite3.connect(_read_only_uri(self.path), uri=True, timeout=60.0, isolation_level=None)
            self.db.execute("PRAGMA query_only=ON")
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} is not a usable results database ({err}); nothing was written "
                             f"to it; {rebuild_hint(self.path)}") from None
        if "runs" not in self._tables():
            self.db.close()
            raise FlatminError(f"{self.path} is an SQLite database but not flatmin's results (no table "
                               f"'runs' with flatmin's columns); {what}")

    def _tables(self, db: sqlite3.Connection | None = None) -> set[str]:
        """flatmin's tables in the database (``runs`` only when it has flatmin's columns)."""
        db = db or self.db
        names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" in names:
            columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            if not set(RUN_COLUMNS) <= columns:
                names.discard("runs")
        return names

    def _check(self) -> None:
        """Refuse a damaged database, or another program's, before the first write (a header SQLite
        reads can hide damage)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return  # a new store (an empty file is one too)
        db = sqlite3.connect(_read_only_uri(self.path), uri=True, timeout=60.0)
        try:
            problems = [r for (r,) in db.execute("PRAGMA quick_check").fetchall()]
            tables = self._tables(db) if problems == ["ok"] else set()
        finally:
            db.close()
        if problems != ["ok"]:
            raise StoreError(f"{self.path} is damaged ({problems[0]}); nothing was written to it; "
                             f"{rebuild_hint(self.path)}")
        if tables and "runs" not in tables:
            raise FlatminError(f"{self.path} is another program's SQLite database (tables: "
                               f"{', '.join(sorted(tables))}); flatmin creates its tables only in a file "
                               "of its own: choose another path; nothing was written to it")

    def _setup(self, deadline_s: float = 60.0) -> None:
        """WAL mode and the schema. Two processes creating one database at once can get an immediate
        SQLITE_BUSY (lock upgrades that SQLite refuses rather than wait on, so busy_timeout does not
        help): retry with a short randomised back-off until the deadline."""
        end = time.monotonic() + deadline_s
        while True:
            try:
                self.db.execute("PRAGMA busy_timeout=60000")
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(SCHEMA)
                self._migrate()
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or time.monotonic() > end:
                    raise
                time.sleep(0.05 + 0.1 * random.random())

    def _migrate(self) -> None:
        """Add the columns an older store lacks (a peer adding the same one at once is fine)."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        for name, kind in ADDED_COLUMNS:
            if name not in have:
                try:
                    self.db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as err:
                    if "duplicate column" not in str(err):
                        raise

    @contextmanager
    def transaction(self, db: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT: the write lock is taken up front, so checks and writes agree."""
        db = db or self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def done_keys(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM runs")}

    def claim(self, key: str) -> bool:
        """Take the run for this process unless it is finished or another live owner holds it."""
        return self.try_claim(key) == "claimed"

    def try_claim(self, key: str) -> str:
        """"claimed", "done" (finished by anyone) or "held" (a live owner trains it): a claim whose
        owner died is taken over."""
        now = time.time()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM runs WHERE key=?", (key,)).fetchone():
                return "done"
            row = db.execute("SELECT owner, expires FROM claims WHERE key=?", (key,)).fetchone()
            if row and row[0] != self.owner and row[1] > now and not _owner_dead(row[0]):
                return "held"
            db.execute("INSERT OR REPLACE INTO claims VALUES (?,?,?)", (key, self.owner, now + self.lease_s))
        return "claimed"

    def renew(self, keys: list[str], db: sqlite3.Connection | None = None) -> None:
        """Extend the leases of the runs this process is training."""
        with self.transaction(db) as tx:
            tx.executemany("UPDATE claims SET expires=? WHERE key=? AND owner=?",
                           [(time.time() + self.lease_s, k, self.owner) for k in keys])

    @contextmanager
    def heartbeat(self, keys: list[str]) -> Iterator[None]:
        """Renew these leases from a side thread (its own connection) while this thread trains, so a
        run longer than the lease is not taken over by a grid on another host."""
        stop = threading.Event()

        def beat() -> None:
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            try:
                while not stop.wait(self.lease_s / 4):
                    try:
                        self.renew(keys, db)
                    except sqlite3.OperationalError:  # busy past the timeout: try again next beat
                        pass
            finally:
                db.close()

        thread = threading.Thread(target=beat, name="flatmin-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def release(self, key: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM claims WHERE key=? AND owner=?", (key, self.owner))

    def held_elsewhere(self, keys: list[str]) -> list[str]:
        """Unfinished runs that another live process holds."""
        now, done = time.time(), self.done_keys()
        rows = self.db.execute("SELECT key, owner, expires FROM claims").fetchall()
        held = {k for k, o, e in rows if o != self.owner and e > now and not _owner_dead(o)}
        return [k for k in keys if k in held and k not in done]

    def insert(self, key: str, label: str, result: dict[str, Any], run_dir: str | None) -> bool:
        """Record a finished run and drop its claim in one transaction; False if already there."""
        cfg = result["config"]
        kept = ("train", "val", "test", "test_ts", "best_val_epoch", "reliability", "epochs_completed",
                "train_time_s", "cost", "health")
        metrics = {k: result.get(k) for k in kept}
        health = (result.get("health") or {}).get("status")  # None: a run from before run health
        with self.transaction() as db:
            cur = db.execute(
                INSERT,
                (key, cfg["method"], cfg["dataset"], cfg["model"], cfg["augment"], cfg["seed"], label,
                 json.dumps(cfg), json.dumps(metrics), result.get("git_commit"),
                 json.dumps(result.get("versions")), result.get("device"), result.get("time_s"),
                 run_dir, time.time(), health))
            db.execute("DELETE FROM claims WHERE key=?", (key,))
        return cur.rowcount == 1

    def rows(self) -> list[dict[str, Any]]:
        """Every finished run, config and metrics parsed."""
        cur = self.db.execute("SELECT * FROM runs ORDER BY dataset, model, method, label, seed")
        names = [d[0] for d in cur.description]
        out = []
        for values in cur.fetchall():
            row = dict(zip(names, values))
            for k in ("config", "metrics", "versions"):
                row[k] = json.loads(row[k]) if row[k] else None
            out.append(row)
        return out

    def save_selection(self, cell: dict[str, str], chosen: dict[str, Any], metric: str,
                       scores: list[dict[str, Any]]) -> None:
        """What tuning chose for a (method, dataset, model, augment) cell, on which split, and why."""
        name = "/".join(cell[k] for k in ("method", "dataset", "model", "augment"))
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO selections VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (name, cell["method"], cell["dataset"], cell["model"], cell["augment"],
                        json.dumps(chosen), metric, "val", json.dumps(scores), time.time()))

    def selections(self) -> list[dict[str, Any]]:
        if self.read_only and "selections" not in self._tables():
            return []  # a store from before tuning recorded its choices
        cur = self.db.execute("SELECT * FROM selections ORDER BY cell")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, v)) for v in cur.fetchall()]
        for r in rows:
            r["chosen"], r["scores"] = json.loads(r["chosen"]), json.loads(r["scores"])
        return rows
