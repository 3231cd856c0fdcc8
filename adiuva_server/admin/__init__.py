"""The admin API (`/api/v1/admin/...`) and the operations it shares with the `adiuva user` CLI."""
