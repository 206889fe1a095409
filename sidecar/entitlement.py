"""The entitlement rule: is a shop entitled now, and why.

This is the one place the rule lives. It is evaluated at lookup time against
the current clock, so a trial that ends between two events ends on time, and a
grace period covers the delay before Billing reports what the clock already
knows (a renewal, a cancellation at term end).
"""

from __future__ import annotations

from dataclasses import dataclass


# Built for every lookup that finds no kept answer: not frozen, for the reason
# given in events.py.
@dataclass(slots=True)
class StoredEntitlement:
    """One row of the entitlement table, as the rule needs it."""

    shop_id: str
    product: str
    plan: str | None
    status: str
    trial_end: int | None
    current_term_end: int | None
    updated_at: int | None
    customer_deleted: bool = False


# Not frozen either, for the same reason.
@dataclass(slots=True)
class Verdict:
    entitled: bool
    reason: str
    # The moment (UTC seconds) this verdict stops being true, or None if only an
    # event can change it. Lets a cache know how long an answer stays valid.
    valid_until: float | None = None


_DENIED_STATUSES = {"future", "paused", "cancelled"}


def evaluate(row: StoredEntitlement, now: float, grace_s: int) -> Verdict:
    """Decide whether `row` entitles its shop at time `now`."""
    if row.customer_deleted:
        return Verdict(False, "customer_deleted")

    if row.status == "active":
        return Verdict(True, "active")

    if row.status == "in_trial":
        return _until(row.trial_end, now, grace_s, "trial", "trial_ended")

    if row.status == "non_renewing":
        return _until(row.current_term_end, now, grace_s, "non_renewing", "term_ended")

    if row.status in _DENIED_STATUSES:
        return Verdict(False, row.status)
    return Verdict(False, "unknown_status")


def _until(
    end: int | None, now: float, grace_s: int, running: str, ended: str
) -> Verdict:
    # No end date to check: Billing has not told us when it stops, so it runs.
    if end is None:
        return Verdict(True, running)
    deadline = end + grace_s
    if now < deadline:
        return Verdict(True, running, valid_until=deadline)
    return Verdict(False, ended)


def answer(row: StoredEntitlement, verdict: Verdict) -> dict[str, object]:
    """Build the JSON answer for a known shop."""
    return {
        "shop_id": row.shop_id,
        "product": row.product,
        "entitled": verdict.entitled,
        "plan": row.plan,
        "status": row.status,
        "in_trial": verdict.entitled and row.status == "in_trial",
        "trial_end": row.trial_end,
        "current_term_end": row.current_term_end,
        "updated_at": row.updated_at,
        "reason": verdict.reason,
    }


def unknown_shop_answer(
    shop_id: str, reason: str = "unknown_shop"
) -> dict[str, object]:
    """Build the JSON answer for a shop the table does not know.

    `reason` is `upstream_unavailable` when the Billing API was to be asked
    about the shop but could not be.
    """
    return {
        "shop_id": shop_id,
        "entitled": False,
        "status": "unknown",
        "reason": reason,
    }
