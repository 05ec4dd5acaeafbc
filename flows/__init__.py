"""Prefect flows of mf-dist: the application layer."""
