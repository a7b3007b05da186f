"""Services: the SQL and domain logic shared by the API, the executor and the CLI."""
