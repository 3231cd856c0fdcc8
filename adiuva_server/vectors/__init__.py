"""Vector store for the desktop app's semantic search (issue 4)."""
