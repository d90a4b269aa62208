"""The worker's named bounds on what clients may hold and queue (issue 6).

Memory a worker can be made to hold is bounded by:

- ``CacheBudget`` (``budget``): cache tokens of all sessions together, reserved
  whole when a session opens;
- ``MAX_SESSIONS_PER_PEER``: sessions one peer (one TLS-verified node id, i.e.
  one client connection) may hold at once; over it, ``SessionLimit``;
- ``DEFAULT_IDLE_TIMEOUT`` (``sessions``) and ``MAX_SESSION_AGE``: a session is
  freed after that long untouched, or that long after it opened;
- a peer's sessions are freed when its connection drops (its chain has failed
  over anyway: the client replays elsewhere);
- ``MAX_QUEUED_PER_PEER`` (``fairness``): compute requests one peer may have
  waiting; over it, ``Overloaded``. The wire bounds frames and in-flight
  handlers per connection (``meshnode.wire.limits``).
"""

from __future__ import annotations

#: sessions one peer may hold on one worker at once
MAX_SESSIONS_PER_PEER = 128
#: seconds after which any session is freed, busy or not at the next sweep
MAX_SESSION_AGE = 3600.0
#: compute requests (open, step) one peer may have queued on one worker
MAX_QUEUED_PER_PEER = 128
