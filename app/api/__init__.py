"""HTTP API: routes, schemas, errors and dependencies."""
