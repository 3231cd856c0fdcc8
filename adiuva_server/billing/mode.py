"""Whether billing runs on this server: the one place that decides it. Until the license work
lands this is `Settings.licensed` (config.licensed_mode()); at the merge these two functions
become the license state's `allows("billing")` and `allows_new_sales()`."""

from __future__ import annotations

from adiuva_server.config import Settings


def billing_enabled(settings: Settings) -> bool:
    """Billing routes, webhooks and reconciliation are served (otherwise: 404 billing_not_enabled)."""
    return settings.licensed


def allows_new_sales(settings: Settings) -> bool:
    """New checkouts may start (an expired license keeps existing subscribers, sells no more)."""
    return settings.licensed
