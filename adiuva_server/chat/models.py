"""Request and response models of chat and plans (they also generate the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from adiuva_server.chat.plans import ExecutionPlan, PlaybookSummary


class ChatRequest(pydantic.BaseModel):
    message: pydantic.constr(strip_whitespace=True, min_length=1, max_length=20_000)
    # The user's tasks, projects, notes, timelines, comments (and optionally "today"): the
    # server holds none of them, so the client sends what the agents need.
    context: dict[str, Any] = pydantic.Field(default_factory=dict)
    mode: Literal["direct", "plan"] = "direct"
    model: str | None = pydantic.Field(None, description="One of GET /chat/models; pro tier and up.")


class StreamQuery(pydantic.BaseModel):
    token: str | None = pydantic.Field(
        None, max_length=4096, description="the access token (browsers cannot set headers on a WebSocket); "
        "or send it as Authorization: Bearer"
    )


class ChatResponse(pydantic.BaseModel):
    response: str
    actions: list[dict[str, Any]]
    agent: str = pydantic.Field(description="The agent that answered; several, comma-separated, for a pipeline.")


class ChatReply(pydantic.RootModel[ChatResponse | ExecutionPlan]):
    """A ChatResponse, or in plan mode an ExecutionPlan."""


class ModelAvailability(pydantic.BaseModel):
    available: bool
    cause: Literal["unreachable", "model_missing", "litellm_missing", "no_api_key", "timeout", "upstream_error"] | None = (
        pydantic.Field(None, description="Why not, as llm_unavailable problems say it."))
    reason: str | None = pydantic.Field(None, description="Why not, and what the server's admin can do about it.")


class ChatModels(pydantic.BaseModel):
    default: str
    models: list[str] = pydantic.Field(description="Models this account may pick per request.")
    agents: list[str] = pydantic.Field(description="Agents this account may use.")
    availability: dict[str, ModelAvailability] = pydantic.Field(
        default_factory=dict, description="For each of `models`: whether it can answer now (checked against its provider "
        "a few seconds ago at most; for LiteLLM models: installed and the provider's key set, no request is made).")


class PlaybookList(pydantic.BaseModel):
    items: list[PlaybookSummary] = pydantic.Field(description="Steps without their vars; fetch one plan for those.")


class PlanRunRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    context: dict[str, Any] = pydantic.Field(default_factory=dict)
    inputs: dict[pydantic.constr(max_length=64), pydantic.constr(max_length=20_000)] = pydantic.Field(
        default_factory=dict, description="Template variables, e.g. project_id; a step's own vars win."
    )
    model: str | None = None


class BatchResult(pydantic.BaseModel):
    batch_id: str
    plan_id: str
    status: Literal["done", "failed"]
    response: str
    actions: list[dict[str, Any]]
    errors: list[str] = pydantic.Field(default_factory=list, description="Items a data step could not turn into actions.")


class BatchInfo(pydantic.BaseModel):
    batch_id: str
    plan_id: str
    status: str
    started_at: int
    finished_at: int | None


class BatchList(pydantic.BaseModel):
    items: list[BatchInfo]
