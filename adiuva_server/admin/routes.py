"""The admin API under /api/v1/admin: admin accounts only (403 `admin_required` for any other
signed-in account, 401 without a token). Thin: read the request, call AdminService, shape."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from aiohttp import web

from adiuva_server import __version__, errors
from adiuva_server.admin.models import (
    AdminUser, Backends, CreatedUser, DeletedUser, DoctorFinding, DoctorRun, DoctorSummary, License, Llm, NewUser,
    ServerBackup, ServerBackups, Status, StatusCounts, UserChanges, UserPage, UserQuery,
)
from adiuva_server.admin.service import AdminService
from adiuva_server.doctor import FAIL, OK, WARN, iso_utc
from adiuva_server.http.auth import principal
from adiuva_server.chat.models import ModelAvailability
from adiuva_server.keys import ADMIN, CHAT, LICENSE, SETTINGS, SHARED
from adiuva_server.http.routing import Api
from adiuva_server.license.state import SELLING, Evaluation


def _admin_only(handler: Callable) -> Callable:
    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        # Before the body is read or validated: a non-admin learns nothing about the route.
        if not principal(request).is_admin:
            raise errors.AdminRequired("this route is for the server's admins")
        return await handler(request)

    return checked


class AdminApi(Api):
    """An Api whose every route is admin-only, by construction."""

    def route(self, method: str, path: str, *, summary: str, **options: Any) -> Callable:
        assert path.startswith("/admin/") and options.get("auth", True), "admin routes live under /admin and need a token"
        options["errors"] = tuple(sorted({*options.get("errors", ()), 401, 403, 429}))
        declare = super().route(method, path, summary=summary, **options)

        def decorate(fn: Callable) -> Callable:
            declare(fn)
            spec = self.specs[-1]
            checked = _admin_only(spec.handler)
            spec = dataclasses.replace(spec, handler=checked)
            checked.route_spec = spec  # type: ignore[attr-defined]
            self.specs[-1] = spec
            return fn

        return decorate

    def patch(self, path: str, **kw: Any) -> Callable:
        return self.route("PATCH", path, **kw)


api = AdminApi("admin")


def _admin_service(request: web.Request) -> AdminService:
    return request.app[ADMIN]


# -- users ------------------------------------------------------------------------------------


@api.get("/admin/users", summary="List accounts with their usage (search by email)", query=UserQuery,
         response=UserPage)
async def list_users(request: web.Request, query: UserQuery) -> UserPage:
    users, total = await _admin_service(request).list_users(query.q, query.page, query.limit)
    return UserPage(items=[AdminUser.of(u) for u in users], page=query.page, limit=query.limit, total=total)


@api.post("/admin/users", summary="Create an account (a password is generated when none is given)",
          body=NewUser, response=CreatedUser, status=201, errors=(409,))
async def create_user(request: web.Request, body: NewUser) -> CreatedUser:
    user, generated = await _admin_service(request).create_user(body.email, body.password, body.tier, body.admin)
    return CreatedUser(**AdminUser.of(user).model_dump(), password=generated)


@api.get("/admin/users/{user_id}", summary="One account with its usage", response=AdminUser, errors=(404,))
async def get_user(request: web.Request) -> AdminUser:
    return AdminUser.of(await _admin_service(request).user(request.match_info["user_id"]))


@api.patch("/admin/users/{user_id}", summary="Change tier, disabled, admin or password (the last two "
           "of them end the user's sessions)", body=UserChanges, response=AdminUser, errors=(404, 409))
async def update_user(request: web.Request, body: UserChanges) -> AdminUser:
    user = await _admin_service(request).update_user(
        request.match_info["user_id"], tier=body.tier, disabled=body.disabled, admin=body.admin, password=body.password)
    return AdminUser.of(user)


@api.post("/admin/users/{user_id}/unlock", summary="Lift the account's login back-off", status=204, errors=(404,))
async def unlock_user(request: web.Request) -> None:
    await _admin_service(request).unlock(request.match_info["user_id"])


@api.delete("/admin/users/{user_id}", summary="Delete an account and all it owns, at once", response=DeletedUser,
            errors=(404, 409))
async def delete_user(request: web.Request) -> DeletedUser:
    deletion = await _admin_service(request).delete_user(request.match_info["user_id"])
    return DeletedUser(id=deletion.user_id, objects_deleted=deletion.objects_deleted)


# -- the server -------------------------------------------------------------------------------


@api.get("/admin/status", summary="Version, uptime, backends, counts, storage, LLM and license state",
         response=Status)
async def status(request: web.Request) -> Status:
    service, settings = _admin_service(request), request.app[SETTINGS]
    counts = await service.counts()
    provider = "ollama" if settings.llm_model.startswith("ollama/") else "litellm"
    return Status(
        version=__version__, uptime_seconds=round(service.uptime(), 3),
        backends=Backends(database=settings.backend, blobs="s3" if settings.s3_bucket else "files", rate_limits=request.app[SHARED].backend),
        counts=StatusCounts(users=counts.users, records=counts.records, vectors=counts.vectors),
        storage_bytes=counts.storage_bytes, backup_bytes=counts.backup_bytes,
        database_bytes=await service.database_bytes(), default_tier=request.app[LICENSE].default_tier,
        llm=Llm(provider=provider, model=settings.llm_model, router_model=settings.llm_router_model,
                models=list(settings.chat_models),
                availability={m: ModelAvailability(**vars(a)) for m, a in (await request.app[CHAT].llm.availability()).items()}),
        license=license_summary(request.app[LICENSE].current),
        doctor=doctor_summary(service),
    )


def license_summary(ev: Evaluation) -> License:
    lic = ev.license
    summary = License(licensed=ev.licensed, state=ev.status.value, reason=ev.reason, new_sales=ev.status in SELLING)
    if lic is not None:
        summary = summary.model_copy(update=dict(
            id=lic.id, licensee=lic.licensee, features=sorted(lic.features), expires_at=iso_utc(lic.expires_at.timestamp()),
            grace_ends_at=iso_utc(lic.grace_ends_at.timestamp()), days_left=ev.days_left, max_users=lic.max_users))
    return summary


def doctor_summary(service: AdminService) -> DoctorSummary:
    monitor = service.doctor
    run = monitor.last
    last = None if run is None else DoctorRun(
        started_at=run.started_at, finished_at=run.finished_at, duration_seconds=run.duration_seconds,
        ok=run.count(OK), warnings=run.count(WARN), problems=run.count(FAIL), error=run.error,
        findings=[DoctorFinding(level=f.level, area=f.area, message=f.message) for f in run.findings])
    return DoctorSummary(running=monitor.busy, interval_seconds=service.settings.doctor_interval,
                         next_run_at=iso_utc(monitor.next_run) if monitor.next_run and not monitor.busy else None,
                         last_run=last)


@api.post("/admin/doctor", summary="Run the doctor's checks (without --fix) now, in the background; "
          "the result appears in GET /admin/status", response=DoctorSummary, status=202)
async def start_doctor(request: web.Request) -> DoctorSummary:
    service = _admin_service(request)
    service.doctor.trigger()  # one run at a time: during a run, one more follows it
    return doctor_summary(service)


def _server_backup(path, size: int, manifest) -> ServerBackup:
    return ServerBackup(name=path.name, size_bytes=size, created_at=manifest.created_at if manifest else None,
                        counts=manifest.counts if manifest else {})


@api.get("/admin/backups", summary="The server backups in <data dir>/server-backups", response=ServerBackups)
async def list_server_backups(request: web.Request) -> ServerBackups:
    archives = await _admin_service(request).server_backups()
    return ServerBackups(items=[_server_backup(*a) for a in archives])


@api.post("/admin/backups", summary="Take a server backup now (as `adiuva backup create`)",
          response=ServerBackup, status=201, errors=(400,))
async def create_server_backup(request: web.Request) -> ServerBackup:
    path, manifest = await _admin_service(request).create_server_backup()
    return _server_backup(path, path.stat().st_size, manifest)
