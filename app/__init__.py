"""Trawler: a PostgreSQL-native, fully asynchronous scraping job backend."""

__version__ = "0.1.0"
