"""What this daemon holds: claimed rows not yet recorded, by id, with their lease and lane."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import anyio

from dripd.model import ClaimedExecution


@dataclass(slots=True, eq=False)
class HeldRow:
    """One claimed row, from the claim until its outcome is recorded (or it is released)."""

    item: ClaimedExecution
    target: object  # whose send capacity it uses (LaneTarget.key)
    claimed_at: float  # time.perf_counter() when the claim returned
    lease_until: datetime  # as last claimed or renewed
    lost: bool = False  # a renewal found another claim token: never send it
    busy: bool = True  # counts against its target's capacity until its send is over


class Held:
    """The rows this daemon holds, and how many of each target's are still to be sent."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, HeldRow] = {}
        self._busy: Counter[object] = Counter()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: HeldRow) -> None:
        self.rows[row.item.id] = row
        self._busy[row.target] += 1

    def busy(self, target: object) -> int:
        """Rows of `target` claimed and not yet through their send."""
        return self._busy[target]

    def done(self, row_id: uuid.UUID) -> None:
        """The row's send (or decision) is over: its target's capacity is free again."""
        row = self.rows.get(row_id)
        if row is not None and row.busy:
            row.busy = False
            self._drop_busy(row.target)

    def pop(self, row_id: uuid.UUID) -> HeldRow | None:
        """Forget a row (recorded, released or lost)."""
        row = self.rows.pop(row_id, None)
        if row is not None and row.busy:
            row.busy = False
            self._drop_busy(row.target)
        return row

    def leases(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(id, claim token) of every row still held under its own claim."""
        return [(i, r.item.claim_token) for i, r in self.rows.items() if not r.lost]

    def unsent_by_token(self) -> dict[uuid.UUID, list[uuid.UUID]]:
        """Rows never sent, by claim token: the ones a stopping daemon gives back. A row
        whose send is over stays claimed even if its outcome could not be recorded: only
        its lease running out (or a late record) decides it, never a release that would
        let it be sent again at once."""
        grouped: dict[uuid.UUID, list[uuid.UUID]] = {}
        for row_id, row in self.rows.items():
            if row.busy and not row.lost:
                grouped.setdefault(row.item.claim_token, []).append(row_id)
        return grouped

    def _drop_busy(self, target: object) -> None:
        self._busy[target] -= 1
        if self._busy[target] <= 0:
            del self._busy[target]


class Signal:
    """A wake-up that can be set many times and waited on again after a clear (anyio's
    Event cannot be cleared)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()
