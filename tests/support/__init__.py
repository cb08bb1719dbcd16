"""Helpers shared by the test suites: local stand-ins for external services."""
