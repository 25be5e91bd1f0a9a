"""A one-item mailbox where a newer item replaces the waiting one (latest wins).

This is how nothing ever queues behind slow analysis: a producer never waits, and the
consumer always gets the freshest item. The replaced item is handed back to the producer
so it can be counted (and its waiter answered) as dropped.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class SlotClosed(Exception):
    pass


class LatestSlot(Generic[T]):
    def __init__(self) -> None:
        self._item: T | None = None
        self._has_item = False
        self._closed = False
        self._event = asyncio.Event()

    def put(self, item: T) -> T | None:
        """Store `item`; returns the item it replaced, if any."""
        if self._closed:
            raise SlotClosed("slot is closed")
        replaced = self._item if self._has_item else None
        self._item, self._has_item = item, True
        self._event.set()
        return replaced

    async def wait_ready(self) -> T:
        """Wait until an item is waiting and return it without taking it (the consumer
        may wait for something else, meanwhile newer items still replace it)."""
        while not self._has_item:
            if self._closed:
                raise SlotClosed("slot is closed")
            self._event.clear()
            await self._event.wait()
        return self._item  # type: ignore[return-value]

    def take_nowait(self) -> T | None:
        item = self._item if self._has_item else None
        self._item, self._has_item = None, False
        return item

    def close(self) -> T | None:
        """Refuse further puts, wake the consumer; returns the item left waiting."""
        self._closed = True
        self._event.set()
        return self.take_nowait()

    @property
    def has_item(self) -> bool:
        return self._has_item

    @property
    def closed(self) -> bool:
        return self._closed
