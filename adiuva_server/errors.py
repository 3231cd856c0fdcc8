"""One exception hierarchy for the whole server.

Services raise these; `http.problem` turns them into RFC 9457 problem details and the CLI
turns them into a message and an exit code. Nothing else decides status codes.
"""

from __future__ import annotations

from typing import Any


class AdiuvaError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra or {}


class ConfigError(AdiuvaError):
    code = "config_error"
    title = "Invalid configuration"


class ValidationError(AdiuvaError):
    status = 422
    code = "validation_error"
    title = "Request validation failed"

    @classmethod
    def field(cls, loc: str, msg: str, kind: str = "value_error") -> ValidationError:
        """An error about one field of the body, shaped like the model validation errors."""
        return cls(f"{loc}: {msg}", extra={"errors": [{"loc": ["body", loc], "msg": msg, "type": kind}]})


class MalformedRequest(AdiuvaError):
    status = 400
    code = "malformed_request"
    title = "Malformed request"


class ChecksumMismatch(AdiuvaError):
    status = 400
    code = "checksum_mismatch"
    title = "Checksum does not match the uploaded bytes"


class Unauthorized(AdiuvaError):
    status = 401
    code = "unauthorized"
    title = "Authentication required"

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="adiuva"'})
        super().__init__(detail, **kw)


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    title = "Invalid email or password"


class InvalidToken(Unauthorized):
    code = "invalid_token"
    title = "Invalid or expired token"


class TokenReused(Unauthorized):
    code = "token_reused"
    title = "Refresh token was already used; its session has been revoked"


class Forbidden(AdiuvaError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class AccountDisabled(Forbidden):
    code = "account_disabled"
    title = "This account is disabled"


class SignupsClosed(Forbidden):
    code = "signups_closed"
    title = "Registration is closed on this server"


class FeatureNotInTier(Forbidden):
    code = "feature_not_in_tier"
    title = "This feature is not included in your tier"


class NotFound(AdiuvaError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(AdiuvaError):
    status = 409
    code = "conflict"
    title = "Conflict"


class EmailTaken(Conflict):
    code = "email_taken"
    title = "An account with this email already exists"


class ClientClosedRequest(AdiuvaError):
    status = 499  # nginx's convention; nobody reads it, the access log shows it
    code = "client_closed_request"
    title = "Client closed request"


class CursorExpired(AdiuvaError):
    status = 410
    code = "cursor_expired"
    title = "Cursor expired"


class PreconditionFailed(AdiuvaError):
    status = 412
    code = "precondition_failed"
    title = "Precondition failed"


class PayloadTooLarge(AdiuvaError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class QuotaExceeded(AdiuvaError):
    status = 402
    code = "quota_exceeded"
    title = "Storage quota exceeded"


class RateLimited(AdiuvaError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, retry_after: float, detail: str | None = None, **kw: Any) -> None:
        headers = kw.pop("headers", {}) or {}
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        super().__init__(detail, headers=headers, **kw)
        self.retry_after = retry_after


class TooManyConnections(RateLimited):
    code = "too_many_connections"
    title = "Too many open connections"


class ServiceUnavailable(AdiuvaError):
    status = 503
    code = "service_unavailable"
    title = "Service unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """The shared database (PostgreSQL) cannot be reached right now: a restart, a failover.
    Nothing was changed; the client retries after `Retry-After` seconds."""

    code = "database_unavailable"
    title = "The database is unavailable"

    def __init__(self, detail: str | None = None, *, retry_after: int = 2, **kw: Any) -> None:
        headers = kw.pop("headers", {}) or {}
        headers["Retry-After"] = str(retry_after)
        super().__init__(detail or "The database cannot be reached right now; nothing was changed. Try again shortly.",
                         headers=headers, **kw)


class InvalidVector(AdiuvaError):
    status = 400
    code = "invalid_vector"
    title = "Invalid vector request"


class DimensionMismatch(InvalidVector):
    code = "dimension_mismatch"
    title = "Vector dimension does not match the collection"


class MetricMismatch(InvalidVector):
    code = "metric_mismatch"
    title = "Metric does not match the collection"
class LLMUnavailable(ServiceUnavailable):
    """`cause` (a problem field too) says why, for programs: unreachable, model_missing,
    litellm_missing, no_api_key, timeout or upstream_error (chat/llm.py); the detail says it
    for people, and what to do."""

    code = "llm_unavailable"
    title = "The language model is unavailable"

    def __init__(self, detail: str | None = None, *, cause: str = "upstream_error", model: str | None = None,
                 **kw: Any) -> None:
        extra = kw.pop("extra", None) or {}
        extra["cause"] = cause
        if model is not None:
            extra["model"] = model
        super().__init__(detail, extra=extra, **kw)

    @property
    def cause(self) -> str:
        return self.extra["cause"]


class ActiveBatchLimit(QuotaExceeded):
    """A tier quota (DESIGN: quotas over the limit are 402), but one that frees itself when a
    batch finishes: Retry-After says when to try again."""

    title = "Too many active batches"
    retry_after = 5  # seconds: a guess at when a running batch may have finished

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        headers = kw.pop("headers", {}) or {}
        headers.setdefault("Retry-After", str(self.retry_after))
        super().__init__(detail, headers=headers, **kw)


class AdminRequired(Forbidden):
    code = "admin_required"
    title = "This needs an admin account"


class LastAdmin(Conflict):
    code = "last_admin"
    title = "The server must keep an active admin"


class UnsupportedContentEncoding(AdiuvaError):
    status = 415
    code = "unsupported_content_encoding"
    title = "Unsupported Content-Encoding"


class RequestTimeout(AdiuvaError):
    status = 408
    code = "request_timeout"
    title = "Request timeout"


class LicensedModeRequired(Forbidden):
    """Paid plugins and plugin submissions from developers exist in licensed mode only."""

    code = "licensed_mode_required"
    title = "This needs a licensed server"


class PluginChecksFailed(ValidationError):
    """A plugin submission failed the automated review: `failed` names each rule and why."""

    code = "plugin_checks_failed"
    title = "The plugin failed the automated checks"

    def __init__(self, failures: list, **kw: Any) -> None:
        failed = [{"check": f.check, "detail": f.detail} for f in failures]
        checks = ", ".join(dict.fromkeys(f["check"] for f in failed))
        super().__init__(f"failed checks: {checks}", extra={"failed": failed}, **kw)
        self.failures = failures


class BillingNotEnabled(NotFound):
    """Homelab mode (no license allowing billing): every billing route answers this."""

    code = "billing_not_enabled"
    title = "Billing is not enabled on this server"


class BillingNotConfigured(ServiceUnavailable):
    """Licensed mode without STRIPE_SECRET_KEY (or, for webhooks, STRIPE_WEBHOOK_SECRET): the
    seed's stub. Nothing is sent to Stripe and nothing changes."""

    code = "billing_not_configured"
    title = "Billing is not configured on this server"


class SubscriptionExists(Conflict):
    code = "subscription_exists"
    title = "You already have a subscription"


class InvalidWebhookSignature(AdiuvaError):
    status = 400
    code = "invalid_signature"
    title = "Invalid webhook signature"


class PaymentProviderUnavailable(ServiceUnavailable):
    code = "payment_provider_unavailable"
    title = "The payment provider is unavailable"

class LicenseExpired(Forbidden):
    """Licensed mode, but no new checkouts or paid installs (the license expired, or does not
    name the feature): license/state.py's LicenseState.require_new_sales."""

    code = "license_expired"
    title = "This server's license does not allow new sales"


class LicenseUserLimit(Forbidden):
    code = "license_user_limit"
    title = "This server's license allows no more accounts"


class LicenseRefused(AdiuvaError):
    """`adiuva license install` refuses the file (malformed, bad signature, expired...)."""

    status = 422
    code = "license_refused"
    title = "This license file cannot be installed"


class SharedStateUnavailable(ServiceUnavailable):
    """The shared coordination store (REDIS_URL) did not answer: limits that must hold across
    server processes cannot be checked, so the request is refused for now, never let through."""

    code = "shared_state_unavailable"
    title = "Shared state is unavailable"
    retry_after = 5  # seconds: a Redis restart or failover usually takes about this long

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        headers = kw.pop("headers", {}) or {}
        headers.setdefault("Retry-After", str(self.retry_after))
        super().__init__(detail, headers=headers, **kw)
