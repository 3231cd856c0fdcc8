"""Request and response models of the billing routes (they also generate the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adiuva_server.auth.models import Tier

PaidTier = Literal["pro", "power", "team"]


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: PaidTier


class CheckoutResponse(BaseModel):
    checkout_url: str = Field(description="Stripe Checkout's page: open it in the browser")


class PortalResponse(BaseModel):
    portal_url: str = Field(description="Stripe's customer portal: plan changes, cards, invoices")


class SubscriptionOut(BaseModel):
    id: str
    status: str = Field(description="Stripe's status: active, trialing, past_due, unpaid, canceled, ...")
    plan: Tier | None = Field(description="the tier its price buys (null: a price this server does not sell)")
    current_period_end: int | None = Field(description="Unix seconds")
    cancel_at_period_end: bool
    grace_until: int | None = Field(description="past_due: the tier is kept until then (Unix seconds)")


class SubscriptionInfo(BaseModel):
    tier: Tier = Field(description="the account's tier now")
    subscription: SubscriptionOut | None


class WebhookAck(BaseModel):
    received: Literal[True] = True
    outcome: Literal["applied", "duplicate", "stale", "ignored"]
