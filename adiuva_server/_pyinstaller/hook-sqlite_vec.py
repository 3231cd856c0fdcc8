# sqlite_vec.load() opens `vec0` (.so/.dylib/.dll) from the package dir with load_extension: no
# import names it, and its name is not lib*.so, so neither the analysis nor the default
# collect_dynamic_libs patterns find it.
from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("sqlite_vec", search_patterns=["vec0.*"])
