from adiuva_server.cli import main

main()
