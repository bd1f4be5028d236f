"""Keep every CPU busy, to run the slow tests (or anything else) on a loaded machine.

    .venv/bin/python bench/burn.py                # one spinner per CPU, until killed
    .venv/bin/python bench/burn.py -n 3 -s 120    # three spinners, for two minutes

Each spinner is a process in a tight loop. SIGTERM or SIGINT (Ctrl-C, `kill %1`) stops them
all; a spinner whose parent has died (SIGKILL) notices within a moment and exits too.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from types import FrameType

# Iterations between two looks at whether the parent is still there (well under 0.1 s).
_CHECK_EVERY = 200_000


def spin(parent: int) -> None:
    """Burn one CPU until the parent process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    n = 0
    while True:
        n += 1
        if n % _CHECK_EVERY == 0 and os.getppid() != parent:
            return


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n",
        "--procs",
        type=int,
        default=os.cpu_count() or 1,
        help="spinning processes (default: os.cpu_count(), %(default)s here)",
    )
    parser.add_argument(
        "-s", "--seconds", type=float, default=None, help="stop after this long (default: never)"
    )
    args = parser.parse_args(argv)
    if args.procs < 1:
        parser.error("--procs must be at least 1")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    context = multiprocessing.get_context("fork")
    spinners = [
        context.Process(target=spin, args=(os.getpid(),), name=f"burn-{n}", daemon=True)
        for n in range(args.procs)
    ]
    for process in spinners:
        process.start()
    print(
        f"burn: {args.procs} spinner(s), pid {os.getpid()}, "
        + (f"for {args.seconds:g} s" if args.seconds is not None else "until killed"),
        file=sys.stderr,
        flush=True,
    )
    try:
        if args.seconds is None:
            while True:
                time.sleep(3600)
        else:
            time.sleep(args.seconds)
    except SystemExit:
        pass
    finally:
        for process in spinners:
            process.terminate()
        for process in spinners:
            process.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
