"""A throwaway Postgres cluster in a temporary directory, for tests and `dripd dev`."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from dripd.errors import DripdError

log = structlog.get_logger(__name__)

# initdb and postgres refuse to run as root; this is who runs them instead.
DEFAULT_USER = "nobody"

_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 30


def find_bindir() -> Path:
    """The directory holding `initdb` and `pg_ctl`: pg_config's, else Debian's, else PATH's."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    # Newest major version first: /usr/lib/postgresql/16/bin before .../15/bin.
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(p) for p in debian)
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise DripdError(
        "no PostgreSQL server binaries found (looked for initdb and pg_ctl via "
        "`pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH); install the "
        "PostgreSQL server package"
    )


class ThrowawayCluster:
    """A private Postgres server on a free 127.0.0.1 port, removed on stop.

    Use `await start()`/`await stop()`, `start_sync()`/`stop_sync()`, or either
    form of `with`. As root the server runs as `user` (default `nobody`), since
    Postgres refuses to run as root. Data is not fsynced: never keep anything here.
    """

    def __init__(self, *, user: str = DEFAULT_USER, bindir: Path | None = None) -> None:
        self._user = user
        self._bindir = bindir
        self.dir: Path | None = None
        self.port: int | None = None
        self.run_as: str | None = None
        self._running = False

    @property
    def dsn(self) -> str:
        if not self._running or self.port is None:
            raise DripdError("the throwaway cluster is not running")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def start(self) -> str:
        """Create and start the cluster; return a superuser DSN."""
        return await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        """Stop the server (fast mode) and remove its directory."""
        await asyncio.to_thread(self.stop_sync)

    def start_sync(self) -> str:
        """Blocking form of `start`."""
        if self.dir is not None:
            raise DripdError("this throwaway cluster was already started")
        bindir = self._bindir or find_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="dripd-pg-"))
        try:
            ids = self._drop_privileges()
            data, sockets = self.dir / "data", self.dir / "sock"
            sockets.mkdir()
            if ids is not None:
                for path in (self.dir, sockets):
                    os.chown(path, *ids)
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                ids,
                "initdb.log",
                "initdb failed",
            )
            for attempt in range(_START_ATTEMPTS):
                self.port = _free_port()
                (self.dir / "postgres.log").unlink(missing_ok=True)
                options = " ".join(
                    [
                        "-c listen_addresses=127.0.0.1",
                        f"-p {self.port}",
                        f"-k {shlex.quote(str(sockets))}",
                        "-c fsync=off",
                        "-c synchronous_commit=off",
                        "-c full_page_writes=off",
                    ]
                )
                try:
                    self._run(
                        [
                            str(bindir / "pg_ctl"),
                            "-D",
                            str(data),
                            "-l",
                            str(self.dir / "postgres.log"),
                            "-o",
                            options,
                            "-w",
                            "-t",
                            "60",
                            "start",
                        ],
                        ids,
                        "pg_ctl.log",
                        f"the server did not start on 127.0.0.1:{self.port}",
                    )
                except DripdError:
                    # Another process may have taken the port between our probe and bind.
                    if attempt + 1 == _START_ATTEMPTS or not self._port_clash():
                        raise
                else:
                    break
        except BaseException:
            self._remove_dir()
            raise
        self._running = True
        log.info("throwaway_cluster_started", dir=str(self.dir), port=self.port, user=self.run_as)
        return self.dsn

    def stop_sync(self) -> None:
        """Blocking form of `stop`; safe to call twice or after a failed start."""
        if self.dir is None:
            return
        try:
            if self._running:
                bindir = self._bindir or find_bindir()
                ids = self._ids()
                data = str(self.dir / "data")
                pg_ctl = str(bindir / "pg_ctl")
                try:
                    self._run(
                        [pg_ctl, "-D", data, "-m", "fast", "-w", "stop"],
                        ids,
                        "pg_ctl.log",
                        "pg_ctl stop failed",
                    )
                except DripdError:
                    self._run(
                        [pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"],
                        ids,
                        "pg_ctl.log",
                        "pg_ctl stop failed",
                    )
                self._running = False
        finally:
            self._remove_dir()

    def __enter__(self) -> Self:
        self.start_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _drop_privileges(self) -> tuple[int, int] | None:
        ids = self._ids()
        if ids is not None:
            self.run_as = self._user
            log.info("throwaway_cluster_user", user=self._user, reason="postgres refuses root")
        return ids

    def _ids(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(self._user)
        except KeyError:
            raise DripdError(
                f"running as root, and Postgres refuses root; the user {self._user!r} "
                "meant to run it instead does not exist"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _run(self, argv: list[str], ids: tuple[int, int] | None, logname: str, what: str) -> None:
        assert self.dir is not None
        logfile = self.dir / logname
        kwargs: dict[str, Any] = {}
        if ids is not None:
            kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []}
        # PG* variables from the caller's shell must not redirect our tools elsewhere.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        with logfile.open("ab") as out:
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    env=env,
                    check=False,
                    timeout=120,
                    **kwargs,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise DripdError(f"{what}: {exc}{self._as_whom()}") from exc
        if result.returncode != 0:
            raise DripdError(
                f"{what} (exit {result.returncode}{self._as_whom()}); "
                f"last lines of its logs:\n{self._log_tail(logname)}"
            )

    def _as_whom(self) -> str:
        return f", run as user {self.run_as!r} because we are root" if self.run_as else ""

    def _log_tail(self, logname: str) -> str:
        assert self.dir is not None
        parts = []
        for name in (logname, "postgres.log"):
            path = self.dir / name
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
                parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts) or "(no log output)"

    def _port_clash(self) -> bool:
        assert self.dir is not None
        path = self.dir / "postgres.log"
        return path.is_file() and "could not bind" in path.read_text(errors="replace")

    def _remove_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
