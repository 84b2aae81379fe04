"""A reward that never returns for half the completions (used by the no-hang CLI tests)."""

import time


def hang_on_odd_length(completion: str, sample: dict) -> float:
    """Sleeps "forever" when the completion has an odd number of characters; else 0.5."""
    if len(completion) % 2:
        time.sleep(1e6)
    return 0.5


def always_hang(completion: str, sample: dict) -> float:
    time.sleep(1e6)
    return 0.0
