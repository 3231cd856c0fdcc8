# Entry script of the PyInstaller binary (adiuva.spec): the same as the `adiuva` console script.
# It lives outside the package: PyInstaller puts a script's folder on the import path, and
# adiuva_server/ holds `http/`, which would shadow the standard library's http package.
import os
import signal
import sys


def _stop_with_the_launcher() -> None:
    """The one-file binary runs as a launcher that unpacks and starts this process, forwarding
    signals to it. SIGKILL cannot be forwarded, so on Linux ask the kernel to send us SIGTERM
    (a graceful stop) when the launcher dies, whatever killed it."""
    if not (getattr(sys, "frozen", False) and sys.platform.startswith("linux")):
        return
    import ctypes

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != launcher:  # it died before the request took effect
        sys.exit(1)


_stop_with_the_launcher()

from adiuva_server.cli import main  # noqa: E402

main()
