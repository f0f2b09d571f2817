"""SQLite backend: ``SQLiteStore`` (``store``), its schema and statements
(``schema``), and the writes that run on the writer connection's thread (``writes``)."""

from .schema import MIGRATIONS, PLAIN_SCHEMA_VERSION, SCHEMA_VERSION
from .store import JOURNAL_SIZE_LIMIT, SQLiteStore

__all__ = [
    "JOURNAL_SIZE_LIMIT",
    "MIGRATIONS",
    "PLAIN_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "SQLiteStore",
]
