"""PyInstaller hooks for the `adiuva` binary, found through the `pyinstaller40` entry point
(as mitmproxy does), so `adiuva.spec` stays short and any build of this package gets them."""

from pathlib import Path


def hook_dirs() -> list[str]:
    return [str(Path(__file__).parent)]
