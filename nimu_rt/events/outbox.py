"""The bounded queue of frames waiting to be written to one connection.

The hub never awaits a socket: it puts frames here, synchronously, and one
writer task per connection drains the queue at the pace of that client. A
client that cannot keep up therefore only ever delays itself.

The queue holds at most ``capacity`` frames. Frames that carry a coalescing
key (progress and queue updates) replace the older waiting frame with the
same key, so a slow reader gets the latest value instead of every step; the
newer frame takes its place at the back, which keeps frames in seq order.
Every other frame (a status change, a snapshot) is never dropped: when one
does not fit, the outbox closes with :data:`CLOSE_SLOW` and the client
resumes with ``sinceSeq``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable

from nimu_rt.events.frames import CLOSE_SLOW


class _Slot:
    __slots__ = ("text", "key", "fields", "dropped", "born")

    def __init__(
        self,
        text: str,
        key: Hashable | None,
        fields: frozenset[str],
        born: float | None,
    ) -> None:
        self.text = text
        self.key = key
        self.fields = fields
        self.dropped = False
        self.born = born


class Outbox:
    """Frames for one connection, bounded, with latest-wins coalescing.

    Not thread-safe: it lives on the event loop of its connection. It does not
    write to the socket itself; :meth:`get` hands frames to the writer.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: deque[_Slot] = deque()
        self._count = 0  # slots not dropped
        self._by_key: dict[Hashable, _Slot] = {}
        self._ready = asyncio.Event()
        # Set whenever a frame is taken, for wait_for_room.
        self._space = asyncio.Event()
        # Set once: why the connection must end, and whether the frames
        # already queued are still sent first.
        self.close_code: int | None = None
        self.close_reason = ""
        self._drain_first = False
        # Called when the outbox closes without draining. The connection
        # cancels its writer with it: a writer blocked on a client that
        # stopped reading would otherwise never look at the outbox again.
        self.on_abort: Callable[[], None] | None = None
        # The ``born`` time of the frame get() returned last (None for
        # frames that did not come live from the hub), for fan-out latency.
        self.last_born: float | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def put(
        self,
        text: str,
        key: Hashable | None = None,
        fields: frozenset[str] = frozenset(),
        born: float | None = None,
    ) -> None:
        """Queue a frame; never blocks.

        With ``key``, a waiting frame with the same key is dropped if its
        ``fields`` are a subset of this frame's (so nothing it said is lost).
        When the queue is full the outbox closes with :data:`CLOSE_SLOW`.
        """
        if self.close_code is not None:
            return
        if key is not None:
            older = self._by_key.get(key)
            if older is not None and older.fields <= fields:
                older.dropped = True
                self._count -= 1
        if self._count >= self.capacity:
            self.close(CLOSE_SLOW, "too slow: the frame buffer is full")
            return
        slot = _Slot(text, key, fields, born)
        self._slots.append(slot)
        self._count += 1
        if key is not None:
            self._by_key[key] = slot
        if len(self._slots) > 2 * self.capacity:
            # Dropped slots are skipped lazily; compact before they pile up.
            self._slots = deque(s for s in self._slots if not s.dropped)
        self._ready.set()

    def room(self) -> int:
        """How many more frames fit."""
        return self.capacity - self._count

    async def wait_for_room(self, frames: int) -> None:
        """Wait until ``frames`` more fit (at most the capacity), or it closed.

        The caller bounds the wait with its own timeout.
        """
        frames = min(frames, self.capacity)
        while self.close_code is None and self.room() < frames:
            self._space.clear()
            await self._space.wait()

    async def get(self) -> str | None:
        """The next frame to write; None once the connection must close."""
        while True:
            if self.close_code is not None and not (
                self._drain_first and self._count
            ):
                return None
            while self._slots:
                slot = self._slots.popleft()
                if slot.dropped:
                    continue
                if slot.key is not None and self._by_key.get(slot.key) is slot:
                    del self._by_key[slot.key]
                self._count -= 1
                self._space.set()
                self.last_born = slot.born
                return slot.text
            self._ready.clear()
            await self._ready.wait()

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """End the connection with ``code``; the first call wins.

        With ``drain``, frames already queued are written first (an error
        frame explaining the close, say); otherwise they are dropped.
        """
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason[:120]
        self._drain_first = drain
        self._ready.set()
        self._space.set()
        if not drain:
            self._slots.clear()
            self._by_key.clear()
            self._count = 0
            if self.on_abort is not None:
                self.on_abort()
