"""The stop rule for a broken reward: every call of N batches in a row failed (docs/data_and_rewards.md)."""

from __future__ import annotations

from lit_moe_rl.errors import first_line


class RewardFailedError(ValueError):
    """Every reward call of ``stop_after`` consecutive batches failed; the message is one line."""


class FailureTracker:
    """Counts failed reward calls and stops the run when whole batches keep failing.

    Rule: a batch (a training step's rollout or a validation batch) whose every call failed (raised,
    returned a non-number, or missed the deadline) counts as failed; ``stop_after`` failed batches in a
    row raise :class:`RewardFailedError` with the first failure's reason. The sanity-check validation
    scores before the first update, so a reward that cannot work on this data (``KeyError`` on a field
    the rows lack) stops the run before any training. ``stop_after = 0`` never stops.
    """

    def __init__(self, stop_after: int = 1) -> None:
        self.stop_after = stop_after
        self.calls = 0
        self.failed = 0
        self.failed_batches_in_a_row = 0

    def update(self, failures: list[tuple[int, str]], n: int) -> None:
        """Record one batch of ``n`` calls and its ``(index, reason)`` failures; raise when the rule says stop."""
        self.calls += n
        self.failed += len(failures)
        all_failed = n > 0 and len(failures) == n
        self.failed_batches_in_a_row = self.failed_batches_in_a_row + 1 if all_failed else 0
        if self.stop_after and self.failed_batches_in_a_row >= self.stop_after:
            raise RewardFailedError(
                f"rollout.reward: all {n} reward calls failed in {self.failed_batches_in_a_row} batch(es) in a "
                f"row (first: {first_line(failures[0][1])}); stopping instead of training on zero rewards "
                "(check that the reward fits the data's fields; rollout.stop_after_failed_batches sets the rule)"
            )
