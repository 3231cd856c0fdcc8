"""Pages from `string.Template` files in templates/, with every value HTML-escaped unless it is
`Safe` (HTML this module made: a rendered template, an escaped value, or a join of those).
Escaping is the default, so a value cannot reach a page unescaped by forgetting a call."""

from __future__ import annotations

import hashlib
import html
import mimetypes
import string
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources


class Safe(str):
    """Markup that is already escaped."""


def esc(value: object) -> Safe:
    return value if isinstance(value, Safe) else Safe(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[object], sep: str = "") -> Safe:
    return Safe(sep.join(esc(p) for p in parts))


class Templates:
    """Every template of the package, read once; `render(name, **values)` substitutes them all
    (a missing value is a KeyError, not a blank)."""

    def __init__(self) -> None:
        folder = resources.files("adiuva_server.console") / "templates"
        self._templates = {
            entry.name.removesuffix(".html"): string.Template(entry.read_text(encoding="utf-8"))
            for entry in folder.iterdir() if entry.name.endswith(".html")
        }

    def render(self, template: str, /, **values: object) -> Safe:
        return Safe(self._templates[template].substitute({k: esc(v) for k, v in values.items()}))


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    version: str  # in the URL, so browsers may cache an asset for as long as they like


def load_assets() -> dict[str, Asset]:
    folder = resources.files("adiuva_server.console") / "static"
    assets = {}
    for entry in folder.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            body = entry.read_bytes()
            ctype = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            assets[entry.name] = Asset(body, ctype, hashlib.sha256(body).hexdigest()[:12])
    return assets
