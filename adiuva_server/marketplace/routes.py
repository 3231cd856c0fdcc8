"""HTTP routes of the plugin marketplace (`/plugins`) and its review (`/admin/plugins`).
Thin: read the request, call MarketplaceService, shape the answer."""

from __future__ import annotations

import base64

from aiohttp import web

from adiuva_server.admin.routes import AdminApi
from adiuva_server.http.auth import principal
from adiuva_server.http.bodies import read_body
from adiuva_server.http.routing import Api
from adiuva_server.keys import MARKETPLACE
from adiuva_server.marketplace import signing
from adiuva_server.marketplace.models import (
    AdminEarningsQuery, AdminPluginOut, ApproveIn, EarningsOut, EarningsQuery, InstallationOut, InstalledList,
    PackageInfo, PluginDetail, PluginOut, PluginPage, PluginQuery, PurchaseList, PurchaseOut, RatingIn, RatingOut,
    RejectIn, ReviewOut, RevokeIn, SigningKeyOut, SubmissionList, SubmissionOut,
)
from adiuva_server.marketplace.service import MarketplaceService

api = Api("plugins")
admin_api = AdminApi("admin")

PACKAGE_TYPE = "application/gzip"
# Uploads are declared as plain bytes (what clients and tools send); the bytes are a .tar.gz.
_PACKAGE_BODY = {"application/octet-stream": "the plugin package: a .tar.gz with manifest.json at its root "
                 "(README 'Plugins')"}
_PACKAGE_HEADERS = {
    "X-Checksum": "SHA-256 of the body, hex",
    "X-Signature": "Ed25519 signature (base64) of the message README 'Plugins' defines",
    "X-Signature-Key-Id": "the signing key's id (GET /plugins/signing-key)",
    "X-Plugin-Id": "the plugin's id (part of the signed message)",
    "X-Plugin-Version": "the package's version (part of the signed message)",
    "ETag": "the checksum, quoted",
}


def _service(request: web.Request) -> MarketplaceService:
    return request.app[MARKETPLACE]


def _plugin_id(request: web.Request) -> str:
    return request.match_info["plugin_id"]


# Fixed paths before /plugins/{plugin_id}.


@api.get("/plugins", summary="Browse the approved plugins (power and team tiers)", query=PluginQuery,
         response=PluginPage, errors=(403, 429))
async def browse(request: web.Request, query: PluginQuery) -> PluginPage:
    items, total = await _service(request).browse(principal(request), category=query.category, q=query.q,
                                                  sort=query.sort, page=query.page)
    return PluginPage(items=[PluginOut.of(p) for p in items], page=query.page, total=total)


@api.get("/plugins/installed", summary="The caller's installed plugins (revoked ones marked so)",
         response=InstalledList, errors=(429,))
async def installed(request: web.Request) -> InstalledList:
    return InstalledList(items=[InstallationOut.of(i) for i in await _service(request).installed(principal(request))])


@api.get("/plugins/signing-key", summary="The public key that signs every approved package", auth=False,
         response=SigningKeyOut)
async def signing_key(request: web.Request) -> SigningKeyOut:
    key = await _service(request).signing_key()
    return SigningKeyOut(algorithm="Ed25519", scheme=signing.SCHEME, key_id=key.key_id,
                         public_key=base64.b64encode(key.public_raw).decode(), public_key_pem=key.public_pem)


@api.post("/plugins/submissions", summary="Submit a plugin version for review (licensed mode; plugin developers)",
          raw_body=_PACKAGE_BODY, response=SubmissionOut, status=201, errors=(403, 413, 422, 429), read_body=False)
async def submit(request: web.Request) -> SubmissionOut:
    service = _service(request)
    service.require_licensed()  # before a byte of the body is read: a homelab server refuses at once
    data = await read_body(request, service.limits.package_bytes)
    return SubmissionOut.of(await service.submit_as_developer(principal(request), data))


@api.get("/plugins/submissions", summary="The caller's submissions and their reviews (licensed mode)",
         response=SubmissionList, errors=(403, 429))
async def my_submissions(request: web.Request) -> SubmissionList:
    items = await _service(request).submissions_of(principal(request))
    return SubmissionList(items=[SubmissionOut.of(v) for v in items])


@api.get("/plugins/earnings", summary="The caller's earnings as a plugin developer over a period (licensed mode)",
         query=EarningsQuery, response=EarningsOut, errors=(403, 404, 422, 429))
async def my_earnings(request: web.Request, query: EarningsQuery) -> EarningsOut:
    return EarningsOut.of(await _service(request).my_earnings(principal(request), query.since, query.until))


@api.get("/plugins/{plugin_id}", summary="One plugin: manifest, install count, average rating, package checksum "
         "and signature", response=PluginDetail, errors=(403, 404, 429))
async def detail(request: web.Request) -> PluginDetail:
    d = await _service(request).detail(principal(request), _plugin_id(request))
    v = d.version
    return PluginDetail(**PluginOut.of(d.plugin).model_dump(), manifest=v.manifest,
                        package=PackageInfo(checksum=v.checksum, size_bytes=v.size_bytes, signature=v.signature or "",
                                            key_id=v.key_id or ""),
                        installed=d.mine.installed, my_rating=d.mine.stars)


@api.post("/plugins/{plugin_id}/install", summary="Install a plugin (again: no change). A paid one (licensed mode) "
          "answers awaiting_payment with the checkout_url where the user pays once; Stripe's confirmation installs it",
          response=InstallationOut, errors=(403, 404, 409, 429, 503))
async def install(request: web.Request) -> InstallationOut:
    return InstallationOut.of(await _service(request).install(principal(request), _plugin_id(request)))


@api.delete("/plugins/{plugin_id}/install", summary="Uninstall a plugin (any tier; not installed: no change)",
            status=204, errors=(404, 429))
async def uninstall(request: web.Request) -> None:
    await _service(request).uninstall(principal(request), _plugin_id(request))


@api.put("/plugins/{plugin_id}/rating", summary="Rate an installed plugin, 1 to 5 stars (one rating per user; "
         "again: changed)", body=RatingIn, response=RatingOut, errors=(403, 404, 409, 429))
async def rate(request: web.Request, body: RatingIn) -> RatingOut:
    plugin = await _service(request).rate(principal(request), _plugin_id(request), body.stars)
    return RatingOut(plugin_id=plugin.id, stars=body.stars, average_rating=plugin.average_rating,
                     rating_count=plugin.rating_count)


@api.get("/plugins/{plugin_id}/package", summary="The approved package's bytes, with checksum and signature",
         raw_response={PACKAGE_TYPE: "the .tar.gz"}, response_headers=_PACKAGE_HEADERS, errors=(403, 404, 429))
async def package(request: web.Request) -> web.Response:
    p = await _service(request).package(principal(request), _plugin_id(request))
    return web.Response(body=p.data, content_type=PACKAGE_TYPE, headers={
        "X-Checksum": p.checksum, "X-Signature": p.signature, "X-Signature-Key-Id": p.key_id,
        "X-Plugin-Id": p.plugin_id, "X-Plugin-Version": p.version, "ETag": f'"{p.checksum}"',
        "Content-Disposition": f'attachment; filename="{p.plugin_id}-{p.version}.tar.gz"',
    })


# -- review (admins) --------------------------------------------------------------------------


def _reviewer(request: web.Request) -> str:
    return principal(request).email


@admin_api.get("/admin/plugins/pending", summary="Submissions waiting for review", response=SubmissionList)
async def pending(request: web.Request) -> SubmissionList:
    return SubmissionList(items=[SubmissionOut.of(v) for v in await _service(request).pending()])


@admin_api.post("/admin/plugins", summary="Submit a plugin version for review (as `adiuva plugin submit`)",
                raw_body=_PACKAGE_BODY, response=SubmissionOut, status=201, errors=(413, 422), read_body=False)
async def admin_submit(request: web.Request) -> SubmissionOut:
    service = _service(request)
    data = await read_body(request, service.limits.package_bytes)
    return SubmissionOut.of(await service.submit(data, submitted_by=principal(request).id, owner_id=None, admin=True))


@admin_api.get("/admin/plugins/earnings", summary="Plugin revenue over a period: per developer, plugin and currency",
               query=AdminEarningsQuery, response=EarningsOut, errors=(404, 422))
async def earnings(request: web.Request, query: AdminEarningsQuery) -> EarningsOut:
    return EarningsOut.of(await _service(request).earnings(query.developer, query.since, query.until))


@admin_api.get("/admin/plugins/purchases", summary="The latest 100 plugin purchases", response=PurchaseList)
async def purchases(request: web.Request) -> PurchaseList:
    return PurchaseList(items=[PurchaseOut.of(p) for p in await _service(request).purchases()])


@admin_api.post("/admin/plugins/purchases/{purchase_id}/refund", summary="Refund a paid plugin purchase in full "
                "(the developer's transfer and the platform fee reversed; the plugin uninstalled)",
                response=PurchaseOut, errors=(404, 409, 503))
async def refund(request: web.Request) -> PurchaseOut:
    return PurchaseOut.of(await _service(request).refund(request.match_info["purchase_id"],
                                                         by=principal(request).email))


@admin_api.get("/admin/plugins/{plugin_id}", summary="A plugin's versions and every review decision",
               response=AdminPluginOut, errors=(404,))
async def review_record(request: web.Request) -> AdminPluginOut:
    r = await _service(request).review_record(_plugin_id(request))
    p = r.plugin
    return AdminPluginOut(id=p.id, name=p.name, status=p.status, version=p.version, owner_id=p.owner_id,
                          install_count=p.install_count, rating_count=p.rating_count, average_rating=p.average_rating,
                          versions=[SubmissionOut.of(v) for v in r.versions], reviews=[ReviewOut.of(x) for x in r.reviews])


@admin_api.post("/admin/plugins/{plugin_id}/approve", summary="Approve (and sign) the version waiting for review",
                body=ApproveIn, response=SubmissionOut, errors=(404, 409))
async def approve(request: web.Request, body: ApproveIn) -> SubmissionOut:
    return SubmissionOut.of(await _service(request).approve(_plugin_id(request), reviewer=_reviewer(request),
                                                            notes=body.notes))


@admin_api.post("/admin/plugins/{plugin_id}/reject", summary="Reject the version waiting for review, saying why",
                body=RejectIn, response=SubmissionOut, errors=(404,))
async def reject(request: web.Request, body: RejectIn) -> SubmissionOut:
    return SubmissionOut.of(await _service(request).reject(_plugin_id(request), reviewer=_reviewer(request),
                                                           reason=body.reason))


@admin_api.post("/admin/plugins/{plugin_id}/revoke", summary="Withdraw a plugin: hidden from the catalog, its "
                "installations shown revoked", body=RevokeIn, response=AdminPluginOut, errors=(404, 409))
async def revoke(request: web.Request, body: RevokeIn) -> AdminPluginOut:
    service = _service(request)
    await service.revoke(_plugin_id(request), reviewer=_reviewer(request), notes=body.notes)
    return await review_record(request)
