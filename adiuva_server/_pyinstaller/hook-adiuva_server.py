# The migrations and the admin console's templates and static files are read with
# importlib.resources; the distribution metadata lets importlib.metadata answer inside the
# binary as it does in a venv.
from PyInstaller.utils.hooks import collect_data_files, copy_metadata

datas = collect_data_files("adiuva_server", includes=["**/*.sql", "console/templates/*.html", "console/static/*"]) + copy_metadata("adiuva-server")
