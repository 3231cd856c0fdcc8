"""The automated review every submission passes before a human sees it (and every bundled
plugin at import). Pure functions over the package bytes: no database, no I/O.

A package is a gzip-compressed tar with `manifest.json` at its root and the plugin's files.
Each rule has a stable name (`Failure.check`), reported to the submitter with what is wrong:

  package_size        the archive, and what it unpacks to, within the limits
  package_archive     a gzip tar, nothing after it, with manifest.json (valid JSON) at its root
  package_file_count  at most the limit of entries
  package_links       no symbolic or hard links
  package_paths       relative paths that stay inside the package (no /, .., \\, duplicates)
  package_file_types  regular files of the allowed types (text as UTF-8, PNG as PNG), no devices
  manifest_fields     every field present, of its type, within its bounds, nothing unknown
  manifest_binary     no binary blobs (control characters, long base64/hex runs, data: URIs)
  id_format           ^[a-z0-9-]+$, 2 to 64 characters
  id_reserved         not starting with "adiuva" (the project's own namespace)
  version_semver      a semantic version (semver.org 2.0.0)
  permissions_allowed read/write of tasks, projects, notes, timelines, calendar only
The rules that need the catalog (id_unique, name_unique, version_newer, review_pending,
plugin_revoked) are checked by the store, in the transaction that records the submission.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024
ID = re.compile(r"^[a-z0-9-]+$")
RESERVED_PREFIX = "adiuva"
# Fixed paths beside /plugins/{id} and /admin/plugins/{id}: a plugin so named would be unreachable.
RESERVED_IDS = frozenset({"installed", "submissions", "signing-key", "earnings", "purchases", "pending"})
# semver.org's own regular expression (2.0.0).
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
AREAS = ("tasks", "projects", "notes", "timelines", "calendar")
PERMISSIONS = frozenset(f"{area}:{mode}" for area in AREAS for mode in ("read", "write"))
CATEGORIES = ("Productivity", "Communication", "Integrations", "Utilities", "Appearance", "Analytics")
MAX_PRICE_CENTS = 100_000
TEXT_SUFFIXES = frozenset({".js", ".mjs", ".cjs", ".json", ".css", ".html", ".md", ".txt", ".svg"})
PNG_SUFFIX = ".png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PATH_CHARS = 200
# A run of this many base64/hex characters without a space is data, not prose.
_BLOB_RUN = re.compile(r"[A-Za-z0-9+/=_-]{200,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CURRENCY = re.compile(r"^[A-Z]{3}$")

# field: (type, min length, max length) for strings; lists and ints are checked below.
_STRINGS = {"id": (2, 64), "name": (1, 64), "description": (1, 2000), "version": (1, 64), "author": (1, 100),
            "category": (1, 40), "currency": (3, 3)}
REQUIRED = (*_STRINGS, "price_cents", "permissions")
OPTIONAL_STRINGS = {"main": (1, MAX_PATH_CHARS), "homepage": (1, 300), "license": (1, 64)}


@dataclass(frozen=True)
class Limits:
    package_bytes: int
    unpacked_bytes: int
    files: int


@dataclass(frozen=True)
class Failure:
    check: str
    detail: str


@dataclass
class Package:
    """A package that passed every check (or, while checking, what was read so far)."""

    data: bytes
    checksum: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def semver_key(version: str) -> tuple:
    """Precedence as semver.org says: numbers, then a release above its pre-releases, whose
    identifiers compare numerically or as text (numbers first); build metadata ignored."""
    m = SEMVER.match(version)
    if m is None:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, ids)


def check_package(data: bytes, limits: Limits) -> tuple[Package, list[Failure]]:
    """Every pure rule over `data`; the package with its manifest when there are no failures."""
    package = Package(data, hashlib.sha256(data).hexdigest())
    failures: list[Failure] = []
    if len(data) > limits.package_bytes:
        return package, [Failure("package_size", f"the package is {len(data)} bytes; the limit is {limits.package_bytes}")]
    tar_bytes = _gunzip(data, limits.unpacked_bytes, failures)
    if tar_bytes is None:
        return package, failures
    manifest_raw = _read_tar(tar_bytes, limits, package, failures)
    if manifest_raw is None:
        if not failures:  # (when the walk stopped early, its own failure says why)
            failures.append(Failure("package_archive", f"no {MANIFEST} at the root of the package"))
        return package, failures
    if len(manifest_raw) > MAX_MANIFEST_BYTES:
        failures.append(Failure("manifest_binary", f"{MANIFEST} is {len(manifest_raw)} bytes; a manifest is at most "
                                f"{MAX_MANIFEST_BYTES}: no embedded data"))
        return package, failures
    try:
        manifest = json.loads(manifest_raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        failures.append(Failure("package_archive", f"{MANIFEST} is not valid UTF-8 JSON"))
        return package, failures
    if not isinstance(manifest, dict):
        failures.append(Failure("manifest_fields", f"{MANIFEST} must hold a JSON object"))
        return package, failures
    package.manifest = manifest
    failures += check_manifest(manifest)
    main = manifest.get("main", "index.js")
    if isinstance(main, str) and main not in package.files:
        failures.append(Failure("manifest_fields", f"main: the package has no file {main!r}"))
    return package, failures


def check_manifest(m: dict[str, Any]) -> list[Failure]:
    failures: list[Failure] = []

    def fail(check: str, detail: str) -> None:
        failures.append(Failure(check, detail))

    missing = [f for f in REQUIRED if f not in m]
    if missing:
        fail("manifest_fields", "missing: " + ", ".join(missing))
    unknown = sorted(set(m) - set(REQUIRED) - set(OPTIONAL_STRINGS))
    if unknown:
        fail("manifest_fields", "unknown fields: " + ", ".join(k[:40] for k in unknown[:10]))
    for name, (lo, hi) in {**_STRINGS, **OPTIONAL_STRINGS}.items():
        if name not in m:
            continue
        value = m[name]
        if not isinstance(value, str):
            fail("manifest_fields", f"{name} must be a string")
        elif not lo <= len(value) <= hi or value != value.strip():
            fail("manifest_fields", f"{name} must be {lo} to {hi} characters without surrounding spaces")
    price = m.get("price_cents")
    if "price_cents" in m and (type(price) is not int or not 0 <= price <= MAX_PRICE_CENTS):
        fail("manifest_fields", f"price_cents must be an integer from 0 to {MAX_PRICE_CENTS}")
    if isinstance(m.get("currency"), str) and not _CURRENCY.match(m["currency"]):
        fail("manifest_fields", "currency must be an ISO 4217 code such as EUR")
    if isinstance(m.get("category"), str) and m["category"] not in CATEGORIES:
        fail("manifest_fields", f"category must be one of {', '.join(CATEGORIES)}")
    if isinstance(m.get("name"), str) and _CONTROL.search(m["name"]):
        fail("manifest_fields", "name must be one line of text")
    main = m.get("main")
    if isinstance(main, str) and not _safe_path(main):
        fail("manifest_fields", "main must be a relative path inside the package")

    blobs = [k for k, v in _strings(m) if _CONTROL.search(v.replace("\n", "").replace("\t", ""))
             or _BLOB_RUN.search(v) or "data:" in v.lower()]
    if blobs:
        fail("manifest_binary", "binary data in: " + ", ".join(sorted(set(blobs))[:10]))

    plugin_id = m.get("id")
    if isinstance(plugin_id, str):
        if not ID.match(plugin_id) or not 2 <= len(plugin_id) <= 64:
            fail("id_format", "id must match ^[a-z0-9-]+$ (2 to 64 characters)")
        if plugin_id.startswith(RESERVED_PREFIX):
            fail("id_reserved", f"ids starting with {RESERVED_PREFIX!r} are reserved for the project's own plugins")
        elif plugin_id in RESERVED_IDS:
            fail("id_reserved", f"{plugin_id!r} is a path of the plugin routes; choose another id")
    version = m.get("version")
    if isinstance(version, str) and not SEMVER.match(version):
        fail("version_semver", f"version {version[:64]!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    perms = m.get("permissions")
    if "permissions" in m:
        if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms) or len(perms) > len(PERMISSIONS):
            fail("manifest_fields", "permissions must be a list of strings")
        else:
            bad = [p[:40] for p in perms if p not in PERMISSIONS]
            if bad:
                fail("permissions_allowed", f"not allowed: {', '.join(bad[:10])}; allowed: {', '.join(sorted(PERMISSIONS))}")
            if len(set(perms)) != len(perms):
                fail("manifest_fields", "permissions lists one twice")
    return failures


def _strings(value: Any, where: str = "") -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(where, value)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, f"{where}.{k}".strip(".")[:40])]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v, where)]
    return []


def _gunzip(data: bytes, limit: int, failures: list[Failure]) -> bytes | None:
    """Inflate at most `limit` bytes: a small archive that unpacks to gigabytes costs `limit`."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing only
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        failures.append(Failure("package_archive", "the package is not a gzip-compressed tar (.tar.gz)"))
        return None
    if len(out) > limit or inflater.unconsumed_tail:
        failures.append(Failure("package_size", f"the package unpacks to more than {limit} bytes"))
        return None
    if not inflater.eof:
        failures.append(Failure("package_archive", "the gzip stream is truncated"))
        return None
    if inflater.unused_data:
        failures.append(Failure("package_archive", "bytes follow the gzip stream"))
        return None
    return out


def _safe_path(name: str) -> bool:
    path = PurePosixPath(name)
    return (bool(name) and len(name) <= MAX_PATH_CHARS and not name.startswith("/") and "\\" not in name
            and ".." not in path.parts and not _CONTROL.search(name) and ":" not in name)


def _read_tar(tar_bytes: bytes, limits: Limits, package: Package, failures: list[Failure]) -> bytes | None:
    """Walk the (already bounded) tar; return manifest.json's bytes when it is there."""
    manifest_raw = None
    seen: set[str] = set()
    count = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for member in tar:
                count += 1
                if count > limits.files:
                    failures.append(Failure("package_file_count", f"the package has more than {limits.files} entries"))
                    break
                name = member.name[2:] if member.name.startswith("./") else member.name
                name = name.rstrip("/") if member.isdir() else name
                if not _safe_path(name) or name in seen:
                    failures.append(Failure("package_paths", f"{name[:80]!r}: paths must be relative, unique and "
                                            "stay inside the package"))
                    continue
                seen.add(name)
                if member.issym() or member.islnk():
                    failures.append(Failure("package_links", f"{name[:80]!r} is a link; packages hold files only"))
                    continue
                if member.isdir():
                    continue
                if not member.isfile():
                    failures.append(Failure("package_file_types", f"{name[:80]!r} is not a regular file"))
                    continue
                data = tar.extractfile(member).read()
                if name == MANIFEST:
                    manifest_raw = data
                    continue
                package.files.append(name)
                problem = _file_type_problem(name, data)
                if problem:
                    failures.append(Failure("package_file_types", f"{name[:80]!r}: {problem}"))
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as exc:
        failures.append(Failure("package_archive", f"not a readable tar archive ({type(exc).__name__})"))
        return None
    if count == 0:
        failures.append(Failure("package_archive", "the archive is empty"))
        return None
    return manifest_raw


def _file_type_problem(name: str, data: bytes) -> str | None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == PNG_SUFFIX:
        return None if data.startswith(PNG_MAGIC) else "not a PNG image"
    if suffix not in TEXT_SUFFIXES:
        allowed = ", ".join(sorted(TEXT_SUFFIXES | {PNG_SUFFIX}))
        return f"files of this type are not allowed (allowed: {allowed})"
    if b"\x00" in data:
        return "a text file with binary content"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "a text file that is not UTF-8"
    return None


def build_package(folder, *, mtime: int = 0) -> bytes:
    """The package of a plugin folder, byte for byte the same on every run (sorted entries,
    fixed times, owners and modes; gzip without a timestamp): a bundled plugin's checksum does
    not change between starts. Links and odd files are packed as they are, for the checks to
    refuse; directories are implied by the file paths."""
    from pathlib import Path

    root = Path(folder)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_dir() and not path.is_symlink():
                continue
            info = tar.gettarinfo(str(path), arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
            if info.isfile():
                info.mode = 0o644
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return _gzip(buf.getvalue())


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=9, mtime=0)
