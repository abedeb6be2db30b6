"""A real PostgreSQL for the tests: fresh databases `ff_test_<hex>` on the server
FACEFLEET_TEST_PG_URL names (default postgresql://postgres@127.0.0.1:5432/postgres, trust auth),
dropped again afterwards. No mocks: the job store's claims are the server's advisory locks.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ADMIN_URL = os.environ.get("FACEFLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = "ff_test_"


def server_problem(url: str = ADMIN_URL) -> str | None:
    """Why the server does not answer (None when it does)."""
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {url_host(url)} does not answer: {' '.join(str(exc).split())}"
    return None


def url_host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


def database_url(name: str, url: str = ADMIN_URL) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def create_database(url: str = ADMIN_URL) -> str:
    """A new empty database; returns its URL."""
    name = PREFIX + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(name, url)


def drop_database(db_url: str, url: str = ADMIN_URL) -> None:
    """Drop a database create_database made, ending whatever sessions it still has."""
    name = urlsplit(db_url).path.lstrip("/")
    assert name.startswith(PREFIX), name
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def terminate_holder_of_claim(db_url: str, job_id: str) -> int:
    """pg_terminate_backend on the session that holds a job's claim (its bigint advisory lock);
    returns that session's pid."""
    raw = uuid.UUID(job_id).bytes
    classid, objid = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big")
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 1 AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) "
            "AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
            (classid, objid),
        ).fetchone()
        assert row is not None, f"nobody holds the claim of {job_id}"
        conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        return int(row[0])
