"""Shared core of the services: domain types, model backends, settings."""
