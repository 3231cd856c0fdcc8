"""The license's state, live: one `LicenseState` on the app (keys.LICENSE) that billing, the
marketplace, registration and the admin pages ask.

    none      no license file: homelab mode
    invalid   a file that cannot be used (malformed, bad signature, unknown feature...):
              homelab mode; the log says why once
    valid     licensed mode
    expiring  licensed, expiry less than 30 days away: warned in the log (daily) and everywhere
              the state is shown
    in_grace  past expiry, within `grace_days`: everything works; warnings say until when
    expired   past the grace: still licensed mode (free default tier, billing routes answer,
              existing subscribers keep their tier until their paid period ends, data stays
              readable and exportable), but no new checkouts and no paid installs

The time-dependent states are computed from the clock on every question, so expiry takes
effect on the minute; the file itself is read again once a day (`run_daily`), so a renewed,
replaced or removed license counts without a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from adiuva_server import errors
from adiuva_server.clock import Clock, SystemClock
from adiuva_server.config import default_tier
from adiuva_server.license.format import MAX_FILE_BYTES, License, LicenseError, load_public_key, parse

if TYPE_CHECKING:
    from adiuva_server.config import Settings

log = logging.getLogger(__name__)

EXPIRING_DAYS = 30
CHECK_SECONDS = 86400.0
# A license issued this far in this machine's future is refused (a wrong clock here or there);
# less is clock skew.
ISSUE_SKEW = dt.timedelta(days=1)


class LicenseStatus(enum.StrEnum):
    NONE = "none"
    VALID = "valid"
    EXPIRING = "expiring"
    IN_GRACE = "in_grace"
    EXPIRED = "expired"
    INVALID = "invalid"


LICENSED = frozenset({LicenseStatus.VALID, LicenseStatus.EXPIRING, LicenseStatus.IN_GRACE, LicenseStatus.EXPIRED})
SELLING = frozenset({LicenseStatus.VALID, LicenseStatus.EXPIRING, LicenseStatus.IN_GRACE})


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """What the license file held at the last look: a verified license, an error, or neither
    (no file)."""

    license: License | None
    error: LicenseError | None = None


def read(path: Path, key: Ed25519PublicKey) -> Reading:
    """Read and verify the license file (blocking: small file, one signature check)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return Reading(None)
    except OSError as exc:
        return Reading(None, LicenseError("unreadable", f"it cannot be read ({exc.strerror or exc})"))
    try:
        return Reading(parse(raw, key))
    except LicenseError as exc:
        return Reading(None, exc)


@dataclasses.dataclass(frozen=True, slots=True)
class Evaluation:
    """The license's state at one moment."""

    status: LicenseStatus
    reason: str  # one plain sentence: what the state means, or why this is homelab mode
    license: License | None  # set whenever licensed
    now: dt.datetime
    error: str | None = None  # the LicenseError kind, for invalid

    @property
    def licensed(self) -> bool:
        return self.status in LICENSED

    @property
    def days_left(self) -> int | None:
        """Whole days until `expires_at` (negative once past it); None when not licensed."""
        if self.license is None:
            return None
        return (self.license.expires_at - self.now) // dt.timedelta(days=1)


def not_yet_valid(lic: License, now: dt.datetime) -> LicenseError | None:
    if lic.issued_at > now + ISSUE_SKEW:
        return LicenseError("not_yet_valid", f"it is issued on {_day(lic.issued_at)}, in the future "
                            "(is this machine's clock right?)")
    return None


def evaluate(reading: Reading, path: Path, now: dt.datetime) -> Evaluation:
    lic = reading.license
    error = reading.error or (not_yet_valid(lic, now) if lic else None)
    if error is not None:
        return Evaluation(LicenseStatus.INVALID, f"the license file {path} cannot be used: {error.message}. "
                          "Running in homelab mode", None, now, error.kind)
    if lic is None:
        return Evaluation(LicenseStatus.NONE, f"no license file at {path}: homelab mode", None, now)
    expires, grace_end = lic.expires_at, lic.grace_ends_at
    if now < expires - dt.timedelta(days=EXPIRING_DAYS):
        return Evaluation(LicenseStatus.VALID, f"licensed to {lic.licensee} until {_day(expires)}", lic, now)
    if now < expires:
        left = (expires - now) // dt.timedelta(days=1)
        return Evaluation(LicenseStatus.EXPIRING, f"the license of {lic.licensee} expires on {_day(expires)} "
                          f"({left} day(s) left); install its renewal with `adiuva license install FILE`", lic, now)
    if now < grace_end:
        return Evaluation(LicenseStatus.IN_GRACE, f"the license of {lic.licensee} expired on {_day(expires)}; "
                          f"everything keeps working until {_day(grace_end)} (its grace period), then new "
                          "subscriptions and paid installs stop; install its renewal with `adiuva license install FILE`",
                          lic, now)
    return Evaluation(LicenseStatus.EXPIRED, f"the license of {lic.licensee} expired on {_day(expires)} and its grace "
                      f"period ended on {_day(grace_end)}: no new subscriptions or paid installs; existing subscribers "
                      "keep their tier until their paid period ends, and all data stays readable and exportable", lic, now)


def _day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


class LicenseState:
    """The license of this server, as of now. Billing and the marketplace ask `allows(feature)`
    (is the feature on at all) and `allows_new_sales()` (may a new checkout or paid install
    start); registration asks `max_users`; new accounts get `default_tier`."""

    def __init__(self, path: Path, key: Ed25519PublicKey, clock: Clock | None = None, *,
                 fixed_default_tier: str | None = None) -> None:
        self.path = path
        self.key = key
        self.clock: Clock = clock or SystemClock()
        self.fixed_default_tier = fixed_default_tier  # ADIUVA_DEFAULT_TIER or a flag: wins over the mode
        self._reading = Reading(None)
        self._logged: tuple[LicenseStatus, str | None] | None = None
        self.checks = 0  # how many times `check` has read the file

    @classmethod
    def for_settings(cls, settings: Settings, clock: Clock | None = None) -> LicenseState:
        """Not read yet: call `reload()` (blocking) or `await check()`."""
        fixed = settings.default_tier if settings.sources.get("default_tier", "default") != "default" else None
        return cls(settings.license_path, load_public_key(settings.license_public_key), clock, fixed_default_tier=fixed)

    @classmethod
    def load(cls, settings: Settings, clock: Clock | None = None) -> LicenseState:
        """Built and read at once (blocking), for the CLI."""
        state = cls.for_settings(settings, clock)
        state._reading = read(state.path, state.key)
        return state

    # -- reading the file ---------------------------------------------------------------------

    async def check(self) -> Evaluation:
        """Read the file again (in a thread) and log the state as the module says."""
        self._reading = await asyncio.to_thread(read, self.path, self.key)
        current = self.current
        self._log(current)
        self.checks += 1
        return current

    async def run_daily(self) -> None:
        """The background task: check once a day, on this state's clock."""
        while True:
            await self.clock.sleep(CHECK_SECONDS)
            try:
                await self.check()
            except Exception:  # never let the task die: the next day tries again
                log.exception("license check failed; will retry")

    def _log(self, ev: Evaluation) -> None:
        key = (ev.status, ev.error or (ev.license.id if ev.license else None))
        if ev.status in (LicenseStatus.EXPIRING, LicenseStatus.IN_GRACE, LicenseStatus.EXPIRED):
            log.warning("license: %s", ev.reason)  # every check, i.e. daily
        elif key != self._logged:  # none, valid, invalid: once, when it changes
            (log.warning if ev.status is LicenseStatus.INVALID else log.info)("license: %s", ev.reason)
        self._logged = key

    # -- the questions ------------------------------------------------------------------------

    @property
    def current(self) -> Evaluation:
        return evaluate(self._reading, self.path, self.clock.now())

    @property
    def status(self) -> LicenseStatus:
        return self.current.status

    @property
    def licensed(self) -> bool:
        """Licensed mode: valid, expiring, in grace or expired (not none, not invalid)."""
        return self.current.licensed

    @property
    def reason(self) -> str:
        return self.current.reason

    @property
    def license(self) -> License | None:
        """The verified contents while licensed (expired included); None in homelab mode."""
        return self.current.license

    @property
    def days_left(self) -> int | None:
        return self.current.days_left

    @property
    def max_users(self) -> int | None:
        lic = self.license
        return lic.max_users if lic else None

    @property
    def default_tier(self) -> str:
        """The tier of new accounts: ADIUVA_DEFAULT_TIER when set, else free in licensed mode and
        team in homelab mode."""
        return self.fixed_default_tier or default_tier(self.licensed)

    def allows(self, feature: str) -> bool:
        """The license names `feature` (billing, marketplace, sso) and the server is in licensed
        mode, expired included (billing still serves existing subscribers then)."""
        lic = self.license
        return lic is not None and feature in lic.features

    def allows_new_sales(self, feature: str | None = None) -> bool:
        """A new checkout or paid install may start: valid, expiring or in grace (and, given a
        feature, the license names it)."""
        ev = self.current
        return ev.status in SELLING and (feature is None or (ev.license is not None and feature in ev.license.features))

    def require_new_sales(self, feature: str | None = None) -> None:
        """Raise LicenseExpired (403 `license_expired`) unless `allows_new_sales(feature)`."""
        if not self.allows_new_sales(feature):
            ev = self.current
            raise errors.LicenseExpired("this server's license " + (
                "has expired: it takes no new subscriptions or paid installs" if ev.status is LicenseStatus.EXPIRED
                else f"does not include {feature}" if ev.licensed else "is missing or invalid (homelab mode)"))


def describe(ev: Evaluation) -> list[str]:
    """`adiuva license show`'s lines: the state, and what the license says."""
    lic = ev.license
    if lic is None:
        return ["homelab mode", f"state: {ev.status.value}", f"why: {ev.reason}"]
    lines = [f"state: {ev.status.value}", f"licensee: {lic.licensee}", f"license id: {lic.id}",
             f"features: {', '.join(sorted(lic.features)) or 'none'}",
             f"issued: {_day(lic.issued_at)}",
             f"expires: {_day(lic.expires_at)} ({_days(ev.days_left)})",
             f"grace until: {_day(lic.grace_ends_at)} ({lic.grace_days} days)",
             f"max users: {lic.max_users if lic.max_users is not None else 'unlimited'}"]
    if ev.status is not LicenseStatus.VALID:
        lines.append(f"warning: {ev.reason}")
    return lines


def _days(left: int | None) -> str:
    if left is None:
        return ""
    return f"{left} day(s) left" if left >= 0 else f"{-left} day(s) ago"
