"""Adiuva server: the self-hosted backend of the Adiuva desktop app."""

__version__ = "0.1.0"
