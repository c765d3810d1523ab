"""The model registry: jobs and model versions in SQLite, tensors and ONNX beside it.

Files are written atomically (temporary file, fsync, rename) before the row that names
them is committed, so a crash leaves no row pointing at a half-written file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hfl.runtime.state import unusable, write_atomic
from hfl.wire.tensors import dump

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY, app TEXT NOT NULL, model TEXT NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', version INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    job TEXT NOT NULL, version INTEGER NOT NULL, model TEXT NOT NULL,
    safetensors TEXT NOT NULL, onnx TEXT NOT NULL, metrics TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (job, version)
);
"""


@dataclass(frozen=True)
class VersionRecord:
    job: str
    version: int
    model: str
    safetensors: Path
    onnx: Path
    metrics: dict
    created: float


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.root / "registry.sqlite", check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise unusable("open the model registry", self.root, e) from None

    def close(self) -> None:
        self.db.close()

    def save_job(self, job: str, app: str, model: str, state: str, reason: str,
                 version: int) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?) ON CONFLICT(job) DO UPDATE SET "
                "state=excluded.state, reason=excluded.reason, version=excluded.version, "
                "updated=excluded.updated",
                (job, app, model, state, reason, version, time.time()),
            )

    def save_version(self, job: str, model: str, version: int, state: Mapping[str, np.ndarray],
                     onnx: bytes, metrics: dict) -> VersionRecord:
        """Store a version once: a version already stored is never written over (the
        coordinator gives each job id to one job only), and its record is returned."""
        stored = self.versions(job, version)
        if stored:
            return stored[0]
        folder = self.root / "models" / model
        folder.mkdir(parents=True, exist_ok=True)
        st_path = folder / f"{job}-v{version}.safetensors"
        onnx_path = folder / f"{job}-v{version}.onnx"
        write_atomic(st_path, dump(state, metadata={"job": job, "version": str(version)}))
        write_atomic(onnx_path, onnx)
        rec = VersionRecord(job, version, model, st_path, onnx_path, metrics, time.time())
        with self.db:
            self.db.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?,?,?)",
                (job, version, model, str(st_path), str(onnx_path), json.dumps(metrics),
                 rec.created),
            )
        return rec

    def has_version(self, job: str, version: int) -> bool:
        return self.db.execute("SELECT 1 FROM versions WHERE job=? AND version=?",
                               (job, version)).fetchone() is not None

    def job(self, job: str) -> dict | None:
        rows = self._jobs(" WHERE job=?", (job,))
        return rows[0] if rows else None

    def versions(self, job: str | None = None, version: int | None = None,
                 ) -> list[VersionRecord]:
        """Every version (of `job`; only `version` of it when given), by job and version."""
        q = "SELECT job, version, model, safetensors, onnx, metrics, created FROM versions"
        where = [c for c, v in (("job=?", job), ("version=?", version)) if v is not None]
        args = tuple(v for v in (job, version) if v is not None)
        rows = self.db.execute(q + (" WHERE " + " AND ".join(where) if where else "")
                               + " ORDER BY job, version", args).fetchall()
        return [VersionRecord(j, v, m, Path(s), Path(o), json.loads(x), c)
                for j, v, m, s, o, x, c in rows]

    def jobs(self) -> list[dict]:
        return self._jobs(" ORDER BY updated")

    def _jobs(self, where: str, args: tuple = ()) -> list[dict]:
        cur = self.db.execute("SELECT job, app, model, state, reason, version, updated FROM jobs"
                              + where, args)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
