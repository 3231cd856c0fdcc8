"""The agents' tools. The server holds no user content: read tools answer from the context the
client sent with the message; write tools validate their arguments and return an action
descriptor `{"type": <tool name>, ...}` that the client applies locally.

A tool never raises to the loop for a model's mistake: bad arguments come back as
`ToolResult(error=...)`, which the loop feeds back to the model.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

TaskStatus = Literal["todo", "in_progress", "done"]
Priority = Literal["high", "medium", "low"]
ProjectStatus = Literal["active", "archived"]
Id = pydantic.constr(strip_whitespace=True, min_length=1, max_length=200)
Title = pydantic.constr(strip_whitespace=True, min_length=1, max_length=500)
Text = pydantic.constr(max_length=100_000)


class Args(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class Updates(Args):
    @pydantic.model_validator(mode="after")
    def _something_to_change(self) -> Updates:
        target, *changes = type(self).model_fields  # the first field names the item to change
        if not any(getattr(self, n) is not None for n in changes):
            raise ValueError("give at least one field to change")
        return self


# -- arguments ---------------------------------------------------------------------------------

class NoArgs(Args):
    pass


class ListTasks(Args):
    project_id: Id | None = None
    status: TaskStatus | None = None
    priority: Priority | None = None


class CreateTask(Args):
    title: Title
    description: Text | None = None
    project_id: Id | None = None
    status: TaskStatus = "todo"
    priority: Priority = "medium"
    due_date: dt.date | None = None


class UpdateTask(Updates):
    task_id: Id
    title: Title | None = None
    description: Text | None = None
    project_id: Id | None = None
    status: TaskStatus | None = None
    priority: Priority | None = None
    due_date: dt.date | None = None


class TaskRef(Args):
    task_id: Id


class AddComment(Args):
    task_id: Id
    content: pydantic.constr(strip_whitespace=True, min_length=1, max_length=20_000)


class CommentRef(Args):
    comment_id: Id


class ListProjects(Args):
    pass


class ProjectRef(Args):
    project_id: Id


class CreateProject(Args):
    name: Title
    description: Text | None = None
    status: ProjectStatus = "active"


class UpdateProject(Updates):
    project_id: Id
    name: Title | None = None
    description: Text | None = None
    status: ProjectStatus | None = None


class ListTimelines(Args):
    project_id: Id | None = None


class CreateTimeline(Args):
    project_id: Id
    title: Title
    description: Text | None = None
    start_date: dt.date | None = None
    end_date: dt.date | None = None

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> CreateTimeline:
        if self.start_date and self.end_date and self.end_date < self.start_date:
            raise ValueError("end_date is before start_date")
        return self


class UpdateTimeline(Updates):
    timeline_id: Id
    title: Title | None = None
    description: Text | None = None
    start_date: dt.date | None = None
    end_date: dt.date | None = None


class TimelineRef(Args):
    timeline_id: Id


class ListNotes(Args):
    project_id: Id | None = None


class NoteRef(Args):
    note_id: Id


class CreateNote(Args):
    title: Title
    content: Text = ""
    project_id: Id | None = None


class UpdateNote(Updates):
    note_id: Id
    title: Title | None = None
    content: Text | None = None
    project_id: Id | None = None


# -- the tools ---------------------------------------------------------------------------------

Context = Mapping[str, Any]


@dataclass(frozen=True)
class ToolResult:
    data: Any = None
    action: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[Args]
    read: Callable[[Args, Context], Any] | None = None  # None: a write tool
    # For write tools: which argument must name an item of which context collection.
    refs: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema (built once: pydantic's schema generation costs ~1 ms)."""
        params = self.args.model_json_schema()
        params.pop("title", None)
        for prop in params.get("properties", {}).values():
            prop.pop("title", None)
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": params}}

    def run(self, arguments: dict[str, Any] | None, context: Context) -> ToolResult:
        if arguments is None:
            return ToolResult(error="the arguments must be a JSON object")
        try:
            args = self.args.model_validate(arguments)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            )
            return ToolResult(error=f"invalid arguments for {self.name}: {problems}")
        if self.read is not None:
            try:
                return ToolResult(data=self.read(args, context))
            except LookupError as exc:
                return ToolResult(error=str(exc.args[0]))
        for arg, collection in self.refs:
            value = getattr(args, arg, None)
            if value is not None and collection in context and find(context, collection, value) is None:
                return ToolResult(error=f"no {collection[:-1]} with id {value!r} in the user's data")
        action = {"type": self.name, **args.model_dump(mode="json", exclude_none=True)}
        return ToolResult(data={"ok": True, "action": action}, action=action)


def items(context: Context, collection: str) -> list[dict[str, Any]]:
    value = context.get(collection)
    return [i for i in value if isinstance(i, dict)] if isinstance(value, list) else []


def find(context: Context, collection: str, item_id: str) -> dict[str, Any] | None:
    return next((i for i in items(context, collection) if str(i.get("id")) == item_id), None)


def _get(collection: str, arg: str) -> Callable[[Args, Context], Any]:
    def read(args: Args, context: Context) -> Any:
        item_id = getattr(args, arg)
        found = find(context, collection, item_id)
        if found is None:
            raise LookupError(f"no {collection[:-1]} with id {item_id!r} in the user's data")
        return found

    return read


def _filtered(collection: str) -> Callable[[Args, Context], Any]:
    def read(args: Args, context: Context) -> Any:
        wanted = args.model_dump(exclude_none=True)
        return [i for i in items(context, collection) if all(str(i.get(k)) == str(v) for k, v in wanted.items())]

    return read


def _due_today(args: Args, context: Context) -> Any:
    today = str(context.get("today") or dt.date.today().isoformat())
    return [t for t in items(context, "tasks") if str(t.get("due_date") or "")[:10] == today and t.get("status") != "done"]


def _comments(args: TaskRef, context: Context) -> Any:
    found = [c for c in items(context, "comments") if str(c.get("task_id")) == args.task_id]
    task = find(context, "tasks", args.task_id)
    if task is not None and isinstance(task.get("comments"), list):
        found += [c for c in task["comments"] if isinstance(c, dict)]
    return found


def _active_projects(args: Args, context: Context) -> Any:
    return [p for p in items(context, "projects") if p.get("status", "active") == "active"]


TOOLS: dict[str, Tool] = {t.name: t for t in (
    # tasks
    Tool("list_tasks", "List the user's tasks, optionally filtered by project, status or priority.", ListTasks, _filtered("tasks")),
    Tool("create_task", "Create a task. status: todo, in_progress or done; priority: high, medium or low.", CreateTask,
         refs=(("project_id", "projects"),)),
    Tool("update_task", "Change fields of an existing task.", UpdateTask, refs=(("task_id", "tasks"), ("project_id", "projects"))),
    Tool("delete_task", "Delete a task.", TaskRef, refs=(("task_id", "tasks"),)),
    Tool("list_tasks_due_today", "List open tasks due today.", NoArgs, _due_today),
    Tool("list_task_comments", "List the comments of a task.", TaskRef, _comments),
    Tool("add_task_comment", "Add a comment to a task.", AddComment, refs=(("task_id", "tasks"),)),
    Tool("delete_task_comment", "Delete a comment of a task.", CommentRef),
    # projects
    Tool("list_projects", "List the user's active projects.", ListProjects, _active_projects),
    Tool("list_all_projects", "List all projects, archived ones included.", ListProjects, lambda a, c: items(c, "projects")),
    Tool("get_project", "Get one project by id.", ProjectRef, _get("projects", "project_id")),
    Tool("create_project", "Create a project (status active or archived).", CreateProject),
    Tool("update_project", "Change a project; set status to archived to archive it.", UpdateProject, refs=(("project_id", "projects"),)),
    Tool("delete_project", "Permanently delete a project. Only when the user explicitly asks for deletion; "
         "otherwise archive it with update_project.", ProjectRef, refs=(("project_id", "projects"),)),
    # timelines
    Tool("list_timelines", "List timeline milestones, optionally of one project.", ListTimelines, _filtered("timelines")),
    Tool("create_timeline", "Create a timeline milestone in a project (project_id is required).", CreateTimeline,
         refs=(("project_id", "projects"),)),
    Tool("update_timeline", "Change a timeline milestone.", UpdateTimeline, refs=(("timeline_id", "timelines"),)),
    Tool("delete_timeline", "Delete a timeline milestone.", TimelineRef, refs=(("timeline_id", "timelines"),)),
    # notes
    Tool("list_notes", "List the user's notes, optionally of one project.", ListNotes, _filtered("notes")),
    Tool("get_note", "Get one note by id.", NoteRef, _get("notes", "note_id")),
    Tool("create_note", "Create a markdown note, optionally linked to a project.", CreateNote, refs=(("project_id", "projects"),)),
    Tool("update_note", "Change a note's title, markdown content or project.", UpdateNote,
         refs=(("note_id", "notes"), ("project_id", "projects"))),
    Tool("delete_note", "Delete a note.", NoteRef, refs=(("note_id", "notes"),)),
)}
