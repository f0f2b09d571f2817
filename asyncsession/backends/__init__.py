"""Storage backends. Each is one module; Redis and SQLite need their extras."""
