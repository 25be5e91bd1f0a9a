"""The JSON module python-socketio parses every packet with: `safe_json`, so a hostile
payload (100k-deep, 5000-digit numbers, NaN) never reaches a handler nor raises inside
python-socketio. A refused event packet becomes the event `REJECTED_EVENT` carrying the
reason, which the namespace answers with an `invalid_json` error event."""

from __future__ import annotations

import json
from typing import Any

from server import safe_json

REJECTED_EVENT = "__rejected_json__"


def dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, **kwargs)


def loads(data: str | bytes, **kwargs: Any) -> Any:
    head = (data.lstrip()[:1] if isinstance(data, str) else data.lstrip()[:1].decode("latin-1"))
    if head not in ("[", "{"):
        # Not a Socket.IO payload (those are arrays or objects): engine.io also parses its
        # plain-text packets ("probe") with this module and keeps the text on ValueError,
        # which JsonRejected is.
        return safe_json.loads(data)
    try:
        return safe_json.loads(data)
    except safe_json.JsonRejected as exc:
        return [REJECTED_EVENT, str(exc)]
