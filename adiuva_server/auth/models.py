"""Request and response models of the auth routes (they also generate the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Tier = Literal["free", "pro", "power", "team"]


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Limits bound the work an anonymous request can cause (argon2 hashes the whole password).
    email: str = Field(min_length=3, max_length=254, examples=["ada@example.org"])
    password: str = Field(min_length=1, max_length=1024)


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refresh_token: str = Field(min_length=1, max_length=512)


class AuthTokens(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="seconds until the access token expires")


class Me(BaseModel):
    id: str
    email: str
    tier: Tier
    created_at: str = Field(description="ISO 8601, UTC")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
