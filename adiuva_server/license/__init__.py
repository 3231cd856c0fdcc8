"""Licensed mode: the signed license file (format.py), its live state (state.py) and installing
one (install.py). compose.py puts the server's LicenseState on the app (keys.LICENSE) and runs
its daily check."""

from __future__ import annotations

from adiuva_server.license.format import FEATURES, License, LicenseError
from adiuva_server.license.state import LicenseState, LicenseStatus

__all__ = ["FEATURES", "License", "LicenseError", "LicenseState", "LicenseStatus"]
