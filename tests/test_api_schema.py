"""The HTTP API fuzzed by schemathesis against its own OpenAPI document, over real HTTP.

The live daemon (`dripd run`'s Daemon, with its HTTP listener, the lead routes and a fresh
database) runs in a thread of its own with its own event loop, because schemathesis calls
it synchronously from the test's thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import tempfile
import threading
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
import schemathesis
from schemathesis import Case, GenerationMode
from support import apply_text, free_port, one_email

from dripd.config import from_dict
from dripd.db import intake, store
from dripd.engine.daemon import Daemon
from dripd.http import leads
from dripd.http.api import OPERATIONS
from dripd.http.openapi import describe, openapi_document

ONBOARDING = """
[sequence]
key = "onboarding"
reenroll = "always"
entry_events = ["signed_up"]
exit_events = ["purchased"]

[[steps]]
key = "hello"
channel = "email"
subject = "Hello"
text = "Hi"
"""

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
)


def _with_database(dsn: str, name: str) -> str:
    head, _, _ = dsn.rpartition("/")
    return f"{head}/{name}"


class LiveApi:
    """The API on 127.0.0.1 with a fresh database cloned from the migrated template."""

    def __init__(self, admin_dsn: str, template_db: str) -> None:
        self.admin_dsn = admin_dsn
        self.template_db = template_db
        self.database = f"dripd_t_{secrets.token_hex(6)}"
        self.url = ""
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="live-api", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the live API did not start")
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test's thread by start()/stop()
            self._failure = exc
            self._ready.set()

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self._admin(f'CREATE DATABASE "{self.database}" TEMPLATE "{self.template_db}"')
        try:
            dsn = _with_database(self.admin_dsn, self.database)
            pool = await store.create_pool(dsn, min_size=1, max_size=2)
            try:
                await apply_text(pool, one_email("welcome"))
                await apply_text(pool, ONBOARDING)
                await pool.execute(
                    "INSERT INTO dripd.api_tokens (name, token_hash) VALUES ('fuzz', $1)",
                    intake.hash_token(TOKEN),
                )
                port = free_port()
                with tempfile.TemporaryDirectory(prefix="dripd-fuzz-") as sockets:
                    config = from_dict(
                        {
                            "database": {"dsn": dsn, "pool_min": 1, "pool_max": 8},
                            "control": {"socket": f"{sockets}/c.sock"},
                            # One listener: the API and its document.
                            "http": {
                                "listen": f"127.0.0.1:{port}",
                                "admin_listen": f"127.0.0.1:{port}",
                            },
                            "leads": {"enabled": True, "sequence": "welcome"},
                            "log": {"level": "error"},
                        }
                    )
                    daemon = Daemon(config, env={})
                    running = asyncio.create_task(daemon.run(install_signals=False))
                    ready = asyncio.create_task(daemon.ready.wait())
                    await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
                    if running.done():
                        running.result()
                    try:
                        self.url = f"http://127.0.0.1:{port}"
                        self._ready.set()
                        await self._stop.wait()
                    finally:
                        daemon.request_stop()
                        await asyncio.wait_for(running, 30)
            finally:
                await pool.close()
        finally:
            await self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


@pytest.fixture(scope="module")
def live(admin_dsn: str, template_db: str) -> Iterator[LiveApi]:
    server = LiveApi(admin_dsn, template_db)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# The document the live server serves (a test checks it is the same), loaded at import time:
# schemathesis's fixture-based loader (`schemathesis.pytest.from_fixture`) reads
# `Function._nodeid`, which pytest 9.2 removed. Every request still goes over real HTTP.
DOCUMENT = openapi_document(*describe([*OPERATIONS, leads.OPERATION]))
TOKEN = intake.new_token()  # stored (as its hash) in each live database

schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
            "generation": {"max-examples": 30, "database": "none"},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        }
    ),
)


def test_the_live_server_serves_the_fuzzed_document(live: LiveApi) -> None:
    response = httpx.get(f"{live.url}/openapi.json")
    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps(DOCUMENT))


def _key_per_body(case: Case) -> None:
    """Scope a valid case's Idempotency-Key to its body.

    The fuzzer draws few distinct keys ("0" above all), so nearly every valid request would
    be the 422 of a key reused for another body, and the routes themselves would hardly
    run. Scoped to the body, a repeated body still replays its first response.
    """
    key = case.headers.get("Idempotency-Key") if case.headers else None
    if key is None or case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    digest = hashlib.sha256(repr(case.body).encode()).hexdigest()[:8]
    case.headers["Idempotency-Key"] = f"{key[:246]}:{digest}"


@schema.parametrize()
def test_the_api_keeps_to_its_document(case: Case, live: LiveApi) -> None:
    _key_per_body(case)
    case.call_and_validate(base_url=live.url)
