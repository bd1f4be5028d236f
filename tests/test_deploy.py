"""Container and systemd files: they parse, and the entrypoint works outside a container."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from dripd import __version__
from dripd.config import from_dict
from dripd.engine import descriptors

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0], ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_parses_and_copies_what_exists() -> None:
    steps = _instructions()
    assert {op for op, _ in steps} <= INSTRUCTIONS
    assert steps[0][0] == "FROM"
    for op, arg in steps:
        if op == "COPY" and not arg.startswith("--from"):
            *sources, _dest = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
        if op in ("ENTRYPOINT", "CMD", "HEALTHCHECK") and arg.lstrip().startswith("["):
            json.loads(arg)
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    assert entry == ["/usr/local/bin/dripd-entrypoint"]
    container = from_dict(tomllib.loads((ROOT / "deploy" / "dripd.container.toml").read_text()))
    assert container.http.listen == "0.0.0.0:8025"
    # The admin listener (health, metrics) has its own port, and the health check uses it.
    assert container.http.admin_listen == "0.0.0.0:8026"
    assert dict(steps)["EXPOSE"].split() == ["8025", "8026"]
    assert "http://127.0.0.1:8026/healthz" in dict(steps)["HEALTHCHECK"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("DRIPD_CONFIG", None)
    return env


def test_entrypoint_runs_dripd_outside_a_container() -> None:
    out = subprocess.run(
        [ROOT / "deploy" / "entrypoint.sh", "--version"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == f"dripd {__version__}"


def test_entrypoint_migrates_when_asked(server_dsn: str) -> None:
    env = {**_env(), "DRIPD_MIGRATE": "1", "DRIPD_DSN": server_dsn}
    out = subprocess.run(
        [ROOT / "deploy" / "entrypoint.sh", "check-schema", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["current"] is True


def test_systemd_unit_parses_and_points_at_dripd() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "systemd" / "dripd.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("dripd run")
    assert service["KillSignal"] == "SIGTERM"
    assert service["RuntimeDirectory"] == "dripd"
    assert service["User"] == "dripd"
    # Room for the connections the default configuration allows (dripd checks it at start).
    assert int(service["LimitNOFILE"]) >= descriptors.Budget.of(from_dict({})).total
