# Entry script of the PyInstaller binary (adiuva.spec): the same as the `adiuva` console script.
# It lives outside the package: PyInstaller puts a script's folder on the import path, and
# adiuva_server/ holds `http/`, which would shadow the standard library's http package.
from adiuva_server.cli import main

main()
