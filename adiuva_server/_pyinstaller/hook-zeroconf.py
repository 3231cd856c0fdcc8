# zeroconf's modules are compiled with Cython: their imports of one another happen inside the
# extension modules, where the analysis cannot see them (no hook for it in hooks-contrib yet).
from PyInstaller.utils.hooks import collect_submodules

hiddenimports = collect_submodules("zeroconf")
