"""The baseline: a key-value service of the hosted product's published design (FastAPI + SQLite,
one row per key in ``kv(namespace, key, value, created_at, updated_at)``, primary key
``(namespace, key)``, WAL), with its memory endpoints. Run: ``uvicorn benchmarks.hosted_baseline:app``
with ``BASELINE_DB=/path/to.db``. Written for the benchmark from the published description."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

app = FastAPI()
_local = threading.local()
_ready = threading.Lock()
_path: str | None = None  # set on the first request: importing the module writes no file


def _conn() -> sqlite3.Connection:
    """One connection per worker thread (FastAPI runs sync endpoints in a thread pool; one shared
    connection failed under 32 concurrent clients); the database is made on the first call."""
    global _path
    db: sqlite3.Connection | None = getattr(_local, "db", None)
    if db is None:
        with _ready:
            if _path is None:
                path = os.environ.get("BASELINE_DB", "baseline.db")
                init = sqlite3.connect(path)
                init.execute("PRAGMA journal_mode=WAL")
                init.execute(
                    "CREATE TABLE IF NOT EXISTS kv (namespace TEXT, key TEXT, value TEXT, created_at REAL, "
                    "updated_at REAL, PRIMARY KEY (namespace, key))"
                )
                init.commit()
                init.close()
                _path = path
        db = _local.db = sqlite3.connect(_path, timeout=30)
    return db


class Body(BaseModel):
    value: str


@app.put("/memory/{namespace}/{key}")
def put(namespace: str, key: str, body: Body) -> dict[str, object]:
    now = time.time()
    db = _conn()
    db.execute(
        "INSERT INTO kv VALUES (?, ?, ?, ?, ?) ON CONFLICT(namespace, key) DO UPDATE SET value=excluded.value, "
        "updated_at=excluded.updated_at",
        (namespace, key, body.value, now, now),
    )
    db.commit()
    return {"namespace": namespace, "key": key, "stored": True, "bytes": len(body.value.encode())}


@app.get("/memory/{namespace}/{key}")
def get(namespace: str, key: str) -> dict[str, object]:
    row = _conn().execute(
        "SELECT value, created_at, updated_at FROM kv WHERE namespace=? AND key=?", (namespace, key)
    ).fetchone()
    if row is None:
        raise HTTPException(404, "Key not found")
    return {"namespace": namespace, "key": key, "value": row[0], "created_at": row[1], "updated_at": row[2]}
