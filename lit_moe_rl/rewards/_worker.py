"""Entry point of a reward worker process (``python -m lit_moe_rl.rewards._worker FD``).

Protocol on the inherited socket ``FD`` (multiprocessing ``Connection`` framing): receive the parent's
``sys.path`` and the pickled reward function, answer ``("ready", None)`` or ``("error", reason)``; then
for each ``(index, completion, sample)`` answer ``(index, score, reason)``; ``None`` ends the loop.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from multiprocessing.connection import Connection


def serve(conn: Connection) -> None:
    """Load the reward, then score until told to stop or the parent goes away."""
    path, blob = conn.recv()
    sys.path[:] = path
    try:
        fn = pickle.loads(blob)
        from lit_moe_rl.rewards.base import call_one
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        i, completion, sample = task
        conn.send((i, *call_one(fn, completion, sample)))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the parent dies, even while a reward call is stuck."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker ends at its next receive instead
        pass


if __name__ == "__main__":
    _die_with_parent()
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):  # the parent went away
        serve(Connection(int(sys.argv[1])))
