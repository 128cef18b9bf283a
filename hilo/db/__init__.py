"""The database: every table on one metadata (``models``), the store and its engine, the one
writer of events and outbox rows (``outbox``) and of consent (``consent``), the one turn to
write SQLite (``writers``), the send path's driver-level reads (``fastpath``) and the Alembic
migrations.
"""

from hilo.db.store import Store

__all__ = [
    "Store",
]
