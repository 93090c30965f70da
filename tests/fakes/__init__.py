"""In-memory stand-ins for services' stores, for unit tests of their service layers."""
