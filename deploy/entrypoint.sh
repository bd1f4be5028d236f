#!/bin/sh
# Container entrypoint: optionally migrate, then become dripd (so SIGTERM reaches it).
#   DRIPD_MIGRATE=1  run `dripd migrate` before the command (safe with several replicas:
#                    migrations take an advisory lock)
set -eu
if [ "${DRIPD_MIGRATE:-0}" = "1" ]; then
    dripd migrate
fi
if [ "$#" -eq 0 ]; then
    set -- run
fi
exec dripd "$@"
