"""Request and response models of the admin API (they also generate the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adiuva_server.admin.store import UserWithUsage
from adiuva_server.auth.models import Tier
from adiuva_server.chat.models import ModelAvailability

MAX_PAGE_SIZE = 200


class UserQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    q: str | None = Field(default=None, max_length=254, description="part of the email, case-insensitive")
    page: int = Field(default=1, ge=1, le=10**7)
    limit: int = Field(default=50, ge=1, le=MAX_PAGE_SIZE)


class UsageOut(BaseModel):
    records: int
    storage_bytes: int = Field(description="records and vector payloads (the cloud-storage quota)")
    backup_bytes: int
    vectors: int


class AdminUser(BaseModel):
    id: str
    email: str
    tier: Tier
    admin: bool
    disabled: bool
    created_at: str = Field(description="ISO 8601, UTC")
    usage: UsageOut

    @classmethod
    def of(cls, u: UserWithUsage) -> AdminUser:
        usage = u.usage
        return cls(id=u.user.id, email=u.user.email, tier=u.user.tier, admin=u.user.is_admin,
                   disabled=u.user.disabled, created_at=u.user.created_at,
                   usage=UsageOut(records=usage.records, storage_bytes=usage.storage_bytes,
                                  backup_bytes=usage.backup_bytes, vectors=usage.vectors))


class UserPage(BaseModel):
    items: list[AdminUser]
    page: int
    limit: int
    total: int


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(min_length=3, max_length=254)
    password: str | None = Field(default=None, min_length=1, max_length=1024,
                                 description="omitted: one is generated and returned once")
    tier: Tier | None = Field(default=None, description="omitted: the server's default tier")
    admin: bool = False


class CreatedUser(AdminUser):
    password: str | None = Field(description="the generated password (shown only here), or null when one was given")


class UserChanges(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: Tier | None = None
    disabled: bool | None = Field(default=None, description="true ends the user's sessions at once")
    admin: bool | None = None
    password: str | None = Field(default=None, min_length=1, max_length=1024,
                                 description="a new password ends the user's sessions at once")


class DeletedUser(BaseModel):
    id: str
    objects_deleted: int = Field(description="stored objects no one else referenced, deleted at once")


class Backends(BaseModel):
    database: str
    blobs: str
    rate_limits: str


class Llm(BaseModel):
    provider: str
    model: str
    router_model: str
    models: list[str]
    availability: dict[str, ModelAvailability] = Field(
        description="each configured model: whether it can be used now, and if not why (cached a few seconds)")


class License(BaseModel):
    licensed: bool = Field(description="licensed mode (state valid, expiring, in_grace or expired); false: homelab mode")
    state: Literal["none", "valid", "expiring", "in_grace", "expired", "invalid"]
    reason: str = Field(description="one sentence: what the state means, or why this is homelab mode")
    new_sales: bool = Field(description="new checkouts and paid installs may start (valid, expiring, in_grace)")
    id: str | None = None
    licensee: str | None = None
    features: list[str] = Field(default_factory=list, description="of billing, marketplace, sso")
    expires_at: str | None = Field(default=None, description="ISO 8601, UTC")
    grace_ends_at: str | None = None
    days_left: int | None = Field(default=None, description="whole days until expires_at; negative once past it")
    max_users: int | None = Field(default=None, description="null: no cap on accounts")


class StatusCounts(BaseModel):
    users: int
    records: int
    vectors: int


class DoctorFinding(BaseModel):
    level: Literal["ok", "warn", "FAIL"]
    area: str
    message: str


class DoctorRun(BaseModel):
    started_at: str = Field(description="ISO 8601, UTC")
    finished_at: str
    duration_seconds: float
    ok: int
    warnings: int
    problems: int
    findings: list[DoctorFinding]
    error: str | None = Field(description="the run itself failed (see the server log); null otherwise")


class DoctorSummary(BaseModel):
    running: bool = Field(description="a run is in progress or about to start")
    interval_seconds: float = Field(description="ADIUVA_DOCTOR_INTERVAL; 0: runs only when an admin asks")
    next_run_at: str | None = Field(description="the next scheduled run (ISO 8601, UTC); null when none is")
    last_run: DoctorRun | None = Field(description="null: not run yet")


class Status(BaseModel):
    version: str
    uptime_seconds: float
    backends: Backends
    counts: StatusCounts
    storage_bytes: int = Field(description="records and vector payloads, all users")
    backup_bytes: int = Field(description="desktop backups, all users")
    database_bytes: int = Field(description="the metadata database: the SQLite file and its WAL, or the PostgreSQL database")
    default_tier: Tier
    llm: Llm
    license: License
    doctor: DoctorSummary = Field(description="the last background run of `adiuva doctor`'s checks (without --fix)")


class ServerBackup(BaseModel):
    name: str
    size_bytes: int
    created_at: str | None = Field(description="null when the archive's manifest is unreadable")
    counts: dict[str, int]


class ServerBackups(BaseModel):
    items: list[ServerBackup]
