"""Execution plans: steps naming server-side templates (clients see ids only), a builder that
validates them, the store of users' plans (an LRU cache in memory here) and the built-in
playbooks."""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from typing import Any, Literal, Protocol

import pydantic

from adiuva_server import errors
from adiuva_server.chat.prompts import PromptTemplateRegistry
from adiuva_server.chat.tools import TOOLS

PLAN_CACHE_SIZE = 1000
PLANS_PER_USER = 50
MAX_PLAN_BYTES = 64 * 1024  # a stored plan's JSON (name, description, steps with their vars)
MAX_STEPS = 20
WRITE_TOOLS = frozenset(name for name, tool in TOOLS.items() if tool.read is None)
Var = pydantic.constr(max_length=20_000)
StepId = pydantic.constr(pattern=r"^[a-z0-9_]{1,40}$")


class PlanStep(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    id: StepId
    kind: Literal["llm", "data"]
    template_id: str | None = None  # llm steps
    vars: dict[pydantic.constr(max_length=64), Var] = pydantic.Field(default_factory=dict, max_length=32)
    action: str | None = None  # data steps: a write tool, applied to each item the source step produced
    data_from_step: str | None = None


class ExecutionPlan(pydantic.BaseModel):
    plan_id: str
    name: str
    description: str = ""
    steps: list[PlanStep]
    builtin: bool = False


class PlanStepSummary(pydantic.BaseModel):
    """A step as the playbook listing shows it: without its vars."""

    id: str
    kind: Literal["llm", "data"]
    template_id: str | None = None
    action: str | None = None
    data_from_step: str | None = None


class PlaybookSummary(pydantic.BaseModel):
    """A plan in the playbook listing; GET /plans/playbook/{plan_id} has its steps' vars."""

    plan_id: str
    name: str
    description: str = ""
    steps: list[PlanStepSummary]
    builtin: bool = False

    @classmethod
    def of(cls, plan: ExecutionPlan) -> PlaybookSummary:
        return cls(plan_id=plan.plan_id, name=plan.name, description=plan.description, builtin=plan.builtin,
                   steps=[PlanStepSummary(id=s.id, kind=s.kind, template_id=s.template_id, action=s.action,
                                          data_from_step=s.data_from_step) for s in plan.steps])


class PlanSpec(pydantic.BaseModel):
    """A plan a power or team user builds through the API. Its JSON (name, description and
    steps with their vars) may take at most 64 KiB (413 above)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: pydantic.constr(strip_whitespace=True, min_length=1, max_length=200)
    description: pydantic.constr(max_length=2000) = ""
    steps: list[PlanStep] = pydantic.Field(min_length=1, max_length=MAX_STEPS)


def _invalid(loc: str, msg: str) -> errors.ValidationError:
    """Shaped like the model validation errors: loc is the path inside the body."""
    return errors.ValidationError(f"{loc}: {msg}", extra={"errors": [{"loc": ["body", *loc.split(".")], "msg": msg, "type": "value_error"}]})


class ExecutionPlanBuilder:
    def __init__(self, templates: PromptTemplateRegistry, name: str, description: str = "") -> None:
        self.templates = templates
        self.name = name
        self.description = description
        self.steps: list[PlanStep] = []

    def _next_id(self) -> str:
        return f"step_{len(self.steps) + 1}"

    def add_step(self, step: PlanStep) -> ExecutionPlanBuilder:
        self.steps.append(step)
        return self

    def add_llm_step(self, template_id: str, variables: dict[str, str] | None = None, *, step_id: str | None = None) -> ExecutionPlanBuilder:
        return self.add_step(PlanStep(id=step_id or self._next_id(), kind="llm", template_id=template_id, vars=variables or {}))

    def add_data_step(self, action: str, data_from_step: str, *, step_id: str | None = None) -> ExecutionPlanBuilder:
        return self.add_step(PlanStep(id=step_id or self._next_id(), kind="data", action=action, data_from_step=data_from_step))

    def build(self, plan_id: str | None = None, *, builtin: bool = False) -> ExecutionPlan:
        """Raises ValidationError naming the first bad step."""
        if not self.steps:
            raise _invalid("steps", "a plan needs at least one step")
        if len(self.steps) > MAX_STEPS:
            raise _invalid("steps", f"a plan has at most {MAX_STEPS} steps")
        seen: dict[str, PlanStep] = {}
        for i, step in enumerate(self.steps):
            loc = f"steps.{i}"
            if step.id in seen:
                raise _invalid(f"{loc}.id", f"duplicate step id {step.id!r}")
            if step.kind == "llm":
                if step.template_id not in self.templates:
                    raise _invalid(f"{loc}.template_id", f"unknown template id {step.template_id!r}")
                if step.action or step.data_from_step:
                    raise _invalid(loc, "an llm step takes template_id and vars only")
            else:
                if step.action not in WRITE_TOOLS:
                    raise _invalid(f"{loc}.action", f"action must be one of {', '.join(sorted(WRITE_TOOLS))}")
                source = seen.get(step.data_from_step or "")
                if source is None:
                    raise _invalid(f"{loc}.data_from_step", "must name an earlier step")
                if source.kind != "llm":
                    raise _invalid(f"{loc}.data_from_step", "must name an llm step")
                if step.template_id or step.vars:
                    raise _invalid(loc, "a data step takes action and data_from_step only")
            seen[step.id] = step
        return ExecutionPlan(plan_id=plan_id or "pl_" + secrets.token_urlsafe(12), name=self.name,
                             description=self.description, steps=list(self.steps), builtin=builtin)


def builtin_playbooks(templates: PromptTemplateRegistry) -> list[ExecutionPlan]:
    return [
        ExecutionPlanBuilder(templates, "Create tasks from a project",
                             "Extracts actionable tasks from a project (input: project_id) and creates them.")
        .add_llm_step("tpl_task_extract_from_project", step_id="extract")
        .add_data_step("create_task", "extract", step_id="create")
        .build("create_tasks_from_project", builtin=True),
        ExecutionPlanBuilder(templates, "Generate a weekly note",
                             "Summarises the week's tasks, projects and notes into a new note.")
        .add_llm_step("tpl_note_weekly_summary", step_id="summarise")
        .add_data_step("create_note", "summarise", step_id="create")
        .build("generate_weekly_note", builtin=True),
    ]


class PlanStore(Protocol):
    """Where users' plans (plan-mode answers, built plans) are kept, and the built-in playbooks
    beside them. In memory (`PlanCache`, one process) or in Redis (chat/redis_plans.py), so a
    plan built on one server process can be run on another."""

    builtins: dict[str, ExecutionPlan]

    async def put(self, owner: str, plan: ExecutionPlan) -> None:
        """Raises PayloadTooLarge when the plan is over the size limit (nothing is stored)."""

    async def get(self, owner: str, plan_id: str) -> ExecutionPlan:
        """A built-in or the owner's plan; NotFound otherwise (someone else's plan included)."""

    async def list(self, owner: str) -> list[ExecutionPlan]:
        """The built-ins, then the owner's plans, least recently used first."""


def check_plan_size(plan: ExecutionPlan, max_bytes: int) -> str:
    """The plan's JSON, or PayloadTooLarge."""
    data = plan.model_dump_json()
    size = len(data.encode())
    if size > max_bytes:
        raise errors.PayloadTooLarge(
            f"a plan may take at most {max_bytes // 1024} KiB (name, description, steps and their vars); "
            f"this one takes {size // 1024 + 1} KiB"
        )
    return data


def no_such_plan(plan_id: str) -> errors.NotFound:
    return errors.NotFound(f"no playbook {plan_id!r}")


class PlanCache:
    """Plans built by users (and plan-mode answers). Kept in memory only: plan variables may hold
    user content, which is never persisted. Each plan is at most MAX_PLAN_BYTES; each owner keeps
    at most `per_user` plans (their own least recently used is dropped first, so one account
    cannot push out everyone else's), and `maxsize` bounds them all (least recently used first).
    One event loop and no await inside: each method is atomic."""

    def __init__(self, builtins: list[ExecutionPlan], maxsize: int = PLAN_CACHE_SIZE,
                 per_user: int = PLANS_PER_USER, max_bytes: int = MAX_PLAN_BYTES) -> None:
        self.builtins = {p.plan_id: p for p in builtins}
        self.maxsize = maxsize
        self.per_user = per_user
        self.max_bytes = max_bytes
        self._plans: OrderedDict[str, tuple[str, ExecutionPlan]] = OrderedDict()
        self._owned: dict[str, OrderedDict[str, None]] = {}  # owner -> plan ids, least recently used first

    def __len__(self) -> int:
        return len(self._plans)

    async def put(self, owner: str, plan: ExecutionPlan) -> None:
        check_plan_size(plan, self.max_bytes)
        self._discard(plan.plan_id)
        while len(self._owned.get(owner, ())) >= self.per_user:
            self._discard(next(iter(self._owned[owner])))
        self._plans[plan.plan_id] = (owner, plan)
        self._owned.setdefault(owner, OrderedDict())[plan.plan_id] = None
        while len(self._plans) > self.maxsize:
            self._discard(next(iter(self._plans)))

    def _discard(self, plan_id: str) -> None:
        entry = self._plans.pop(plan_id, None)
        if entry is None:
            return
        owned = self._owned[entry[0]]
        del owned[plan_id]
        if not owned:
            del self._owned[entry[0]]

    async def get(self, owner: str, plan_id: str) -> ExecutionPlan:
        if plan_id in self.builtins:
            return self.builtins[plan_id]
        entry = self._plans.get(plan_id)
        if entry is None or entry[0] != owner:  # someone else's plan does not exist for you
            raise no_such_plan(plan_id)
        self._plans.move_to_end(plan_id)
        self._owned[owner].move_to_end(plan_id)
        return entry[1]

    async def list(self, owner: str) -> list[ExecutionPlan]:
        return [*self.builtins.values(), *(self._plans[i][1] for i in self._owned.get(owner, ()))]


def parse_items(text: str) -> list[Any]:
    """The JSON an llm step produced, tolerating code fences and prose around it."""
    text = text.strip()
    candidates = [text]
    for opener, closer in (("[", "]"), ("{", "}")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        return value if isinstance(value, list) else [value]
    raise ValueError("the step did not produce JSON")
