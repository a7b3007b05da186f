"""Route modules, one per resource; app.main includes them all."""
