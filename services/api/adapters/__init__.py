"""I/O of the API: password hashing, tokens, PostgreSQL queries."""
