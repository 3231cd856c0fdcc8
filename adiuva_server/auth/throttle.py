"""Throttles against password guessing: which keys a login counts under, and holding a place
in each before the password is checked.

The promise, per sliding window (`login_failure_window_seconds`), however many requests race:

- at most `login_failures_per_address` wrong passwords are checked from one client address
  (all accounts together);
- at most `login_failures_per_account` wrong passwords are checked for one account from all the
  addresses that have not signed in to it before (a distributed guesser shares this one pool);
- each address that has signed in to the account with its password (at login or registration,
  within `refresh_token_days`) has a pool of its own of the same size for that account.

So a stranger cannot lock a user out of the devices she already uses: failures from elsewhere
fill the strangers' pool, never hers. What a stranger can still block, for one window, is a
first sign-in from an address the account has never been used from; `adiuva user unlock` (or a
new password) lifts that at once. A guesser on an address the user has signed in from (the same
NAT, a reused DHCP lease) gets that address's pool as well: addresses are all the server sees.

Each attempt reserves its place (`RateLimitStore.reserve`) before the argon2 check and refunds it
when the password was right, so a correct password costs nothing and concurrent wrong ones
cannot get past the count. A request that finds the pool full only because of attempts still in
flight waits briefly for them to settle instead of being refused (a burst of correct logins from
one NAT'd address all get through).

Account keys carry the account's throttle generation (users.throttle_generation): unlocking, or a
new password, bumps it in the database, so the running server starts afresh on the next login
even when the change came from the CLI in another process; the old counters expire unread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from adiuva_server import errors
from adiuva_server.ratelimit import RateLimitStore

# How long a request waits for in-flight attempts (~20 ms each, queued on the hash pool) to
# settle before it is refused; past that the pool is genuinely busy.
WAIT_FOR_PENDING_SECONDS = 5.0


def address_tag(secret: str, address: str) -> bytes:
    """What the database keeps of a client address that signed in: a keyed hash, never the
    address itself (only membership is ever asked)."""
    return hmac.new(secret.encode(), b"login-address\0" + address.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()[:16]


def address_key(client: str) -> str:
    return f"login:addr:{client}"


def account_key(email: str, generation: int, known_tag: bytes | None) -> str:
    """The strangers' pool of the account, or the pool of one address it was used from."""
    base = f"login:acct:{generation}:{email}"
    return base if known_tag is None else f"{base}:{known_tag.hex()}"


class Attempt:
    """Places held in one or more throttles for one guarded step. Use as `async with`: places
    are kept (counted as a failure) when the block ends, unless `refund()` was called or the step
    never ran (a throttle refused, or 503: the hash queue was full)."""

    def __init__(self, store: RateLimitStore, window: float) -> None:
        self._store = store
        self._window = window
        self._held: list[tuple[str, object]] = []

    async def take(self, key: str, limit: int, refused: str) -> None:
        deadline = asyncio.get_running_loop().time() + WAIT_FOR_PENDING_SECONDS
        delay = 0.005
        while True:
            decision = await self._store.reserve(key, limit, self._window)
            if decision.allowed:
                assert decision.ticket is not None
                self._held.append((key, decision.ticket))
                return
            if not decision.pending or asyncio.get_running_loop().time() >= deadline:
                await self.refund()  # the step will not run: places taken in other throttles go back
                raise errors.RateLimited(decision.retry_after if not decision.pending else 1.0, refused)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _settle(self, keep: bool) -> None:
        held, self._held = self._held, []
        for key, ticket in held:
            await self._store.settle(key, ticket, keep=keep)

    async def refund(self) -> None:
        await self._settle(keep=False)

    async def __aenter__(self) -> Attempt:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self._settle(keep=not isinstance(exc, errors.ServiceUnavailable))
