"""The chat service: tier gates, intent routing, single agent or pipeline with synthesis,
plan mode, running plans as batches; every answer passes the sanitizer on its way out."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from adiuva_server import errors, tiers
from adiuva_server.chat.agents import AgentRegistry, AgentResult, ChatAgent, Emit, registry
from adiuva_server.chat.batches import BatchStore
from adiuva_server.chat.llm import LLM, Availability
from adiuva_server.chat.models import BatchResult, ChatRequest, ChatResponse, PlanRunRequest
from adiuva_server.chat.plans import (
    ExecutionPlan, ExecutionPlanBuilder, PlanCache, PlanSpec, PlanStore, builtin_playbooks, parse_items,
)
from adiuva_server.chat.prompts import ROUTER_PROMPT, SYNTHESIS_PROMPT, PromptTemplateRegistry
from adiuva_server.chat.sanitizer import Sanitizer
from adiuva_server.chat.tools import TOOLS
from adiuva_server.config import Settings

log = logging.getLogger(__name__)

FALLBACK_AGENT = "task_agent"
PIPELINE_RESULTS = "Results of earlier steps"


class Orchestrator:
    def __init__(self, settings: Settings, llm: LLM, batches: BatchStore, agents: AgentRegistry = registry,
                 plan_store: Callable[..., PlanStore] = PlanCache) -> None:
        self.settings = settings
        self.llm = llm
        self.batches = batches
        self.registry = agents
        self.prompts = PromptTemplateRegistry()
        self.sanitizer = Sanitizer(self.prompts.fingerprints(), [a.name for a in agents] + [PIPELINE_RESULTS])
        self.plans = plan_store(builtin_playbooks(self.prompts), per_user=settings.chat_max_plans_per_user)
        self._agent_names = re.compile(r"\b(" + "|".join(re.escape(a.name) for a in agents) + r")\b")

    # -- tier gates ------------------------------------------------------------------------------

    def agents_for(self, tier: str) -> list[ChatAgent]:
        limited = tiers.limit(tier, "agents") is not None
        return [a for a in self.registry if a.in_free_tier or not limited]

    def models_for(self, tier: str) -> list[str]:
        models = self.settings.chat_models
        return list(models) if tiers.limit(tier, "llm_providers") is None else [models[0]]

    async def availability(self, tier: str) -> dict[str, Availability]:
        """Whether each model of `models_for(tier)` can answer now."""
        known = await self.llm.availability()
        return {m: known[m] for m in self.models_for(tier)}

    def pick_model(self, tier: str, requested: str | None) -> str:
        if requested is None or requested == self.settings.llm_model:
            return self.settings.llm_model
        if requested not in self.settings.chat_models:
            raise errors.ValidationError.field("model", f"not a configured model; choose one of {', '.join(self.settings.chat_models)}")
        if requested not in self.models_for(tier):
            tiers.require_unlimited(tier, "llm_providers", "choosing a model")
        return requested

    def check_agents(self, tier: str, names: list[str]) -> None:
        allowed = {a.name for a in self.agents_for(tier)}
        for name in names:
            if name not in allowed:
                tiers.require_unlimited(tier, "agents", f"the {name.replace('_', ' ')}")

    # -- routing ---------------------------------------------------------------------------------

    async def classify_intent(self, message: str, agent_model: str | None = None) -> list[str]:
        """Agent names in the order they should work; task_agent when the router is unsure,
        answers nonsense or is unreachable (unless the agent would use that same model: then
        LLMUnavailable at once, rather than a second wait for the same dead model)."""
        listing = "\n".join(f"- {a.name}: {a.description}" for a in self.registry)
        prompt = ROUTER_PROMPT.replace("$agents", listing)
        try:
            answer = await self.llm.complete(
                self.settings.llm_router_model,
                [{"role": "system", "content": prompt}, {"role": "user", "content": message}],
            )
        except errors.LLMUnavailable:
            if agent_model == self.settings.llm_router_model:
                raise
            log.warning("router model unavailable; falling back to %s", FALLBACK_AGENT)
            return [FALLBACK_AGENT]
        names = list(dict.fromkeys(self._agent_names.findall(answer.text)))
        return names or [FALLBACK_AGENT]

    async def route_single(self, name: str, message: str, context: Mapping[str, Any], model: str,
                           emit: Emit | None = None) -> AgentResult:
        return await self.registry.call_agent(name, self.llm, model, self.prompts, message, context, emit=emit)

    async def route_pipeline(self, names: list[str], message: str, context: Mapping[str, Any], model: str,
                             emit: Emit | None = None) -> AgentResult:
        results: list[AgentResult] = []
        for name in names:
            results.append(await self.registry.call_agent(name, self.llm, model, self.prompts, message, context, previous=results))
        merged = json.dumps([{"agent": r.agent, "response": r.response, "actions": r.actions} for r in results])
        messages = [
            {"role": "system", "content": SYNTHESIS_PROMPT},
            {"role": "user", "content": f"{PIPELINE_RESULTS}:\n{merged}"},
            {"role": "user", "content": message},
        ]
        parts = []
        async for delta in self.llm.stream(model, messages):
            if delta.text:
                parts.append(delta.text)
                if emit is not None:
                    await emit(delta.text)
        return AgentResult(",".join(names), "".join(parts), [a for r in results for a in r.actions])

    async def orchestrate(self, who: Any, request: ChatRequest, emit: Emit | None = None) -> ChatResponse | ExecutionPlan:
        """Direct mode answers (streaming text through `emit`, sanitized, when given); plan mode
        returns the plan it would run, cached so the client can run it."""
        model = self.pick_model(who.tier, request.model)
        # Plan mode calls no agent model: a dead router still yields a (task_agent) plan.
        names = await self.classify_intent(request.message, model if request.mode == "direct" else None)
        self.check_agents(who.tier, names)
        if request.mode == "plan":
            builder = ExecutionPlanBuilder(self.prompts, "Plan for your request", "Runs " + ", ".join(names))
            for name in names:
                builder.add_llm_step(self.registry.get(name).template_id, {"message": request.message})
            plan = builder.build()
            await self.plans.put(who.id, plan)
            return plan
        guarded = self.sanitizer.stream() if emit is not None else None

        async def send(chunk: str) -> None:
            safe = guarded.feed(chunk)
            if safe:
                await emit(safe)

        out = send if emit is not None else None
        if len(names) == 1:
            result = await self.route_single(names[0], request.message, request.context, model, out)
        else:
            result = await self.route_pipeline(names, request.message, request.context, model, out)
        if guarded is not None and (tail := guarded.flush()):
            await emit(tail)
        return ChatResponse(response=self.sanitizer.text(result.response), actions=self.sanitizer.json(result.actions),
                            agent=result.agent)

    # -- plans and batches -----------------------------------------------------------------------

    async def build_plan(self, who: Any, spec: PlanSpec) -> ExecutionPlan:
        tiers.require_feature(who, "batch_builder")
        builder = ExecutionPlanBuilder(self.prompts, spec.name, spec.description)
        for step in spec.steps:
            builder.add_step(step)
        plan = builder.build()
        await self.plans.put(who.id, plan)
        return plan

    def _agent_of(self, template_id: str | None) -> ChatAgent | None:
        return next((a for a in self.registry if a.template_id == template_id), None)

    async def run_plan(self, who: Any, plan_id: str, body: PlanRunRequest) -> BatchResult:
        plan = await self.plans.get(who.id, plan_id)
        model = self.pick_model(who.tier, body.model)
        self.check_agents(who.tier, [a.name for s in plan.steps if (a := self._agent_of(s.template_id))])
        batch_id = await self.batches.start(who.id, plan.plan_id, tiers.limit(who, "active_batches"))
        status = "failed"
        try:
            response, actions, problems = await self._execute(plan, body, model)
            status = "failed" if problems else "done"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            await self.batches.finish(batch_id, status)
        return BatchResult(batch_id=batch_id, plan_id=plan.plan_id, status=status, response=self.sanitizer.text(response),
                           actions=self.sanitizer.json(actions), errors=problems)

    async def _execute(self, plan: ExecutionPlan, body: PlanRunRequest, model: str) -> tuple[str, list[dict], list[str]]:
        outputs: dict[str, str] = {}
        actions: list[dict] = []
        problems: list[str] = []
        response = ""
        for step in plan.steps:
            if step.kind == "llm":
                variables = {**body.inputs, **step.vars}
                agent = self._agent_of(step.template_id)
                if agent is not None:
                    result = await agent.handle(self.llm, model, self.prompts, variables.get("message", ""), body.context)
                    text = result.response
                    actions += result.actions
                else:
                    messages = [
                        {"role": "system", "content": self.prompts.render(step.template_id, variables)},
                        {"role": "user", "content": "Context (the user's data):\n" + json.dumps(body.context, default=str)},
                    ]
                    text = (await self.llm.complete(model, messages)).text
                outputs[step.id] = response = text
                continue
            try:
                produced = parse_items(outputs[step.data_from_step])
            except ValueError as exc:
                problems.append(f"{step.id}: {exc}")
                continue
            for i, item in enumerate(produced):
                outcome = TOOLS[step.action].run(item if isinstance(item, dict) else None, body.context)
                if outcome.error is not None:
                    problems.append(f"{step.id}[{i}]: {outcome.error}")
                elif outcome.action is not None:
                    actions.append(outcome.action)
        return response, actions, problems
