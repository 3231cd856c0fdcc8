"""The settings page's rows: each setting's value, shown safely, and where it came from.
Secrets are never shown, only whether they are set; a URL's password is masked."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping

from adiuva_server.config import JWT_SECRET_FILE, Settings

# By name: whatever holds a credential now, or will when a later setting is added with such a name.
_SECRET = re.compile(r"secret|(^|_)password$|api_key|apikey|access_key|credential|private_key|(^|_)token$|^stripe_(?!price)")
MASK = "•••••• (set)"


def is_secret(name: str) -> bool:
    return _SECRET.search(name) is not None


def _mask_url(text: str) -> str:
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return text
    if parts.scheme and parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username}:******@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return text


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ", ".join(_mask_url(str(v)) for v in value) or "(none)"
    if value is None or value == "":
        return "(not set)"
    return _mask_url(str(value))


def setting_rows(settings: Settings) -> list[tuple[str, str, str]]:
    """(name, value as shown, source) for every setting."""
    rows = []
    for f in dataclasses.fields(settings):
        if f.name == "sources":
            continue
        value = getattr(settings, f.name)
        source = settings.sources.get(f.name, "default")
        if is_secret(f.name):
            shown = MASK if value else "(not set)"
            if f.name == "jwt_secret" and source == "default":
                source, shown = "data dir", f"{MASK}, generated and kept in {settings.data_dir / JWT_SECRET_FILE}"
        else:
            shown = _show(value)
        rows.append((f.name, shown, source))
    return rows
