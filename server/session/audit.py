"""Who did what: an append-only log of what operators (and the server itself) did to
sessions — reviews, re-scorings, erasures, retention sweeps — with the operator token's
name and the time. Operators read it with `GET /api/audit`.

An entry is {id, at, actor, action, session_id, details}: `id` a random uuid (portable,
no autoincrement), `at` Unix seconds, `actor` the name of the operator token
(`API_TOKENS`; "operator" for `API_TOKEN`, "anonymous" in development mode) or "system",
`details` a small JSON object. Entries outlive the sessions they name (an erasure's entry
is what remains of it), so `details` never carries the session's data (job data, frames);
a review's note is kept until its session is erased, then removed (`forget_notes`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from server.session.store import Store

#: What the log records. "rescore" is written by the re-scoring endpoint.
Action = Literal["review", "rescore", "erase", "retention_sweep"]
ACTIONS: tuple[str, ...] = ("review", "rescore", "erase", "retention_sweep")
SYSTEM = "system"


class AuditLog:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def record(
        self,
        actor: str,
        action: Action,
        session_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Queue one entry (committed with the store's next batch; a caller that must
        know it is stored flushes). Returns the entry."""
        entry = {
            "id": str(uuid.uuid4()),
            "at": time.time(),
            "actor": actor,
            "action": action,
            "session_id": session_id,
            "details": dict(details or {}),
        }
        await self.store.add_audit_entry(entry)
        return entry

    async def forget_notes(self, session_id: str) -> int:
        """An erased session's review entries keep who decided what and when, not the
        reviewer's notes (they may describe the candidate). Returns how many changed."""
        changed = 0
        offset = 0
        while True:
            page = await self.store.audit_entries(session_id, 500, offset)
            for entry in page:
                details = entry["details"]
                if entry["action"] == "review" and details.get("note") is not None:
                    details = {**details, "note": None, "note_erased": True}
                    await self.store.set_audit_details(entry["id"], session_id, details)
                    changed += 1
            if len(page) < 500:
                return changed
            offset += 500

    async def entries(
        self, session_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Newest first, including entries queued but not yet committed."""
        await self.store.flush(since=self.store.mark())
        return await self.store.audit_entries(session_id, limit, offset)
