"""Whether billing runs on this server: the one place that decides it, from the license's
live state (license/state.py), asked each time because a license expires or is renewed
without a restart."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adiuva_server.license.state import LicenseState


def billing_enabled(license: LicenseState) -> bool:
    """Billing routes, webhooks and reconciliation are served (otherwise: 404 billing_not_enabled):
    licensed mode with a license naming `billing`, expired included (existing subscribers go on)."""
    return license.allows("billing")


def require_new_sales(license: LicenseState) -> None:
    """New checkouts may start only under a valid, expiring or in-grace license naming billing
    (403 `license_expired` otherwise; an expired license keeps existing subscribers, sells no more)."""
    license.require_new_sales("billing")
