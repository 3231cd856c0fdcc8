"""The Stripe stand-in (tests/stripe_standin.py) as a fixture: one per test, on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.stripe_standin import StripeStandIn


@pytest.fixture
async def stripe_standin():
    standin = StripeStandIn()
    await standin.start()
    yield standin
    await standin.stop()
