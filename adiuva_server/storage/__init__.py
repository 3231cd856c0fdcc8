"""End-to-end encrypted storage: a content-addressed blob store, records with a sync feed, and
backups, with per-user quotas. The server stores opaque bytes and never holds a key."""
