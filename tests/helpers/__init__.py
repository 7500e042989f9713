"""Shared test helpers (thread-backed communicator, torchrun launcher)."""
