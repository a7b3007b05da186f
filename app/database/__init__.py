"""Database layer: models, connection manager, embedded PostgreSQL."""
