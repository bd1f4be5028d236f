"""The one exception tree of dripd, grouped by what the caller should do.

    DripdError
    ├── ConfigError          bad configuration or input: fix it and run again (exit 2)
    │   ├── SequenceFileError    a sequence file is invalid (names file, step, key)
    │   └── CredentialsError     the encryption key or a credential is unusable
    ├── SchemaError          the database schema is missing or out of date: run migrate
    ├── NotFound             the named thing does not exist in this tenant scope
    ├── Conflict             the request contradicts current state (e.g. replay of a sent row)
    ├── HookError            a hook failed or may not be reached: the step retries later
    └── DatabaseError        Postgres was unreachable or lost the connection: retry later
        └── Refused          Postgres refused the statement: retrying the same will not help

Each class's docstring is its default message.
"""

from __future__ import annotations


class DripdError(Exception):
    """dripd failed."""

    exit_code = 1
    code = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(DripdError):
    """The configuration or the input is invalid."""

    exit_code = 2
    code = "bad_input"


class SequenceFileError(ConfigError):
    """A sequence file is invalid."""


class CredentialsError(ConfigError):
    """The encryption key or a stored credential cannot be used."""

    code = "credentials"


class SchemaError(DripdError):
    """The database schema is not current: run `dripd migrate`."""

    code = "schema"


class NotFound(DripdError):
    """Not found."""

    code = "not_found"


class Conflict(DripdError):
    """The request conflicts with the current state."""

    code = "conflict"


class HookError(DripdError):
    """A hook failed."""

    code = "hook"


class DatabaseError(DripdError):
    """The database refused the request or could not be reached."""

    code = "database"


class Refused(DatabaseError):
    """Postgres refused the statement."""
