"""Operations an admin runs on a whole server (migrating between backends, ...): plain
importable functions the CLI wraps, never inside routes modules."""
