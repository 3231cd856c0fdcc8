"""The four domain agents, their registry and the tool loop they share."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adiuva_server import errors
from adiuva_server.chat.llm import LLM
from adiuva_server.chat.prompts import PromptTemplateRegistry
from adiuva_server.chat.tools import TOOLS, Tool

log = logging.getLogger(__name__)

MAX_TOOL_ITERATIONS = 5
Emit = Callable[[str], Awaitable[None]]


@dataclass
class AgentResult:
    agent: str
    response: str
    actions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ChatAgent:
    name: str
    description: str  # what the router reads
    tool_names: tuple[str, ...]
    in_free_tier: bool = True

    @property
    def template_id(self) -> str:
        return f"tpl_{self.name}_default"

    @property
    def tools(self) -> list[Tool]:
        return [TOOLS[n] for n in self.tool_names]

    async def handle(self, llm: LLM, model: str, prompts: PromptTemplateRegistry, query: str,
                     context: Mapping[str, Any], *, previous: Sequence[AgentResult] = (),
                     emit: Emit | None = None) -> AgentResult:
        messages = [
            {"role": "system", "content": prompts.render(self.template_id)},
            {"role": "user", "content": "Context (the user's data):\n" + json.dumps(context, default=str)},
        ]
        if previous:
            done = [{"agent": p.agent, "response": p.response, "actions": p.actions} for p in previous]
            messages.append({"role": "user", "content": "Results of earlier steps:\n" + json.dumps(done)})
        messages.append({"role": "user", "content": query})
        text, actions = await tool_loop(llm, model, messages, self.tools, context, emit)
        return AgentResult(self.name, text, actions)


class AgentRegistry:
    def __init__(self) -> None:
        self._agents: dict[str, ChatAgent] = {}

    def register(self, agent: ChatAgent) -> ChatAgent:
        if agent.name in self._agents:
            raise ValueError(f"agent {agent.name} registered twice")
        unknown = [t for t in agent.tool_names if t not in TOOLS]
        if unknown:
            raise ValueError(f"agent {agent.name} names unknown tools {unknown}")
        self._agents[agent.name] = agent
        return agent

    def get(self, name: str) -> ChatAgent:
        try:
            return self._agents[name]
        except KeyError:
            raise errors.NotFound(f"no agent named {name!r}") from None

    def list_agents(self) -> list[ChatAgent]:
        return list(self._agents.values())

    def __iter__(self) -> Iterator[ChatAgent]:
        return iter(self._agents.values())

    async def call_agent(self, name: str, llm: LLM, model: str, prompts: PromptTemplateRegistry, query: str,
                         context: Mapping[str, Any], **kw: Any) -> AgentResult:
        return await self.get(name).handle(llm, model, prompts, query, context, **kw)


# Static definitions, not state: the registry holds the same four agents in every app.
registry = AgentRegistry()
registry.register(ChatAgent(
    "task_agent", "tasks and their comments: list, create, update, complete, delete, what is due today",
    ("list_tasks", "create_task", "update_task", "delete_task", "list_tasks_due_today",
     "list_task_comments", "add_task_comment", "delete_task_comment"),
))
registry.register(ChatAgent(
    "project_agent", "projects: list, look up, create, rename, archive, delete",
    ("list_projects", "list_all_projects", "get_project", "create_project", "update_project", "delete_project"),
))
registry.register(ChatAgent(
    "timeline_agent", "project timelines and milestones: list, plan, move, delete",
    ("list_timelines", "create_timeline", "update_timeline", "delete_timeline"),
    in_free_tier=False,
))
registry.register(ChatAgent(
    "note_agent", "markdown notes: list, read, write, edit, delete",
    ("list_notes", "get_note", "create_note", "update_note", "delete_note"),
))


async def tool_loop(llm: LLM, model: str, messages: list[dict], tools: Sequence[Tool], context: Mapping[str, Any],
                    emit: Emit | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Call the model, run the tools it asks for, feed the results back; at most
    MAX_TOOL_ITERATIONS model calls. Text is emitted as the model produces it."""
    by_name = {t.name: t for t in tools}
    schemas = [t.schema for t in tools]
    texts: list[str] = []
    actions: list[dict[str, Any]] = []
    for _ in range(MAX_TOOL_ITERATIONS):
        separator = "\n\n" if texts else ""
        parts: list[str] = []
        completion = None
        async for delta in llm.stream(model, messages, schemas):
            if delta.text:
                if not parts and separator and emit is not None:
                    await emit(separator)
                parts.append(delta.text)
                if emit is not None:
                    await emit(delta.text)
            completion = delta.completion or completion
        assert completion is not None  # LLM.stream ends with a completion or raises
        if completion.text.strip():
            texts.append(completion.text)
        if not completion.tool_calls:
            return "\n\n".join(texts), actions
        messages.append({
            "role": "assistant", "content": completion.text,
            "tool_calls": [{"id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.raw_arguments or json.dumps(c.arguments)}}
                           for c in completion.tool_calls],
        })
        for call in completion.tool_calls:
            tool = by_name.get(call.name)
            if tool is None:
                result = {"error": f"unknown tool {call.name!r}; available: {', '.join(by_name)}"}
            else:
                outcome = tool.run(call.arguments, context)
                if outcome.error is not None:
                    log.info("tool %s: %s", call.name, outcome.error)
                    result = {"error": outcome.error}
                else:
                    result = outcome.data
                    if outcome.action is not None:
                        actions.append(outcome.action)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result, default=str)})
    log.info("tool loop stopped after %d iterations", MAX_TOOL_ITERATIONS)
    texts.append("I could not finish this in the steps I am allowed; here is what I did so far.")
    if emit is not None:
        await emit(("\n\n" if len(texts) > 1 else "") + texts[-1])
    return "\n\n".join(texts), actions
