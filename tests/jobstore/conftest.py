"""The job store's fixtures (pg_url, fresh_pg_url) live in tests/conftest.py: the spine's tests
run workers on the same database."""
