"""More than one machine (SPEC "More than one machine", README "Running a cluster").

Identical nodes share one store and one Redis: each node owns the sessions it started
(`node.py`: identity and session ids carrying the node's tag), holds a lease on them in the
store and reaps the sessions of nodes whose lease lapsed (`leases.py`), forwards requests
for a session another node owns to that node (`forwarding.py`, `routing.py`), and carries
Socket.IO events to watchers on every node over Redis (`fanout.py`). `redis_link.py` is
the node's Redis connection; the Rekognition budget and spend caps are shared through it
(`shared_budget.py`, `shared_spend.py`) and recorded-video jobs run from a Redis queue
(`video_queue.py`, `redis_parts.py`). `nginx.py` renders the proxy configuration
shipped in `deploy/`, `devcluster.py` is `make cluster`.
"""
