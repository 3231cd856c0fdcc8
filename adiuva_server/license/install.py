"""`adiuva license install`: verify a license file, then put it in place atomically (mode 0600)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from adiuva_server import errors
from adiuva_server.clock import Clock, SystemClock
from adiuva_server.license.format import MAX_FILE_BYTES, LicenseError, load_public_key, parse
from adiuva_server.license.state import Evaluation, LicenseStatus, Reading, evaluate, not_yet_valid

if TYPE_CHECKING:
    from adiuva_server.config import Settings


def install(settings: Settings, source: Path, clock: Clock | None = None) -> Evaluation:
    """Install `source` as the server's license and return its state. LicenseRefused (nothing
    changed) for a file that is unreadable, malformed, wrongly signed, names an unknown feature,
    or is past its grace period; one in its grace period is installed (the caller warns)."""
    try:
        with open(source, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise errors.LicenseRefused(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        lic = parse(raw, load_public_key(settings.license_public_key))
    except LicenseError as exc:
        raise errors.LicenseRefused(f"{source} is not a valid license: {exc.message}") from None
    target, now = settings.license_path, (clock or SystemClock()).now()
    if (early := not_yet_valid(lic, now)) is not None:
        raise errors.LicenseRefused(f"{source} is not a valid license: {early.message}")
    ev = evaluate(Reading(lic), target, now)
    if ev.status is LicenseStatus.EXPIRED:
        raise errors.LicenseRefused(f"{source} has expired: {ev.reason}")
    write_atomically(target, raw)
    return ev


def write_atomically(target: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one; the new one survives a crash."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".license-", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
