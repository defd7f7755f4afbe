"""Proposers: each builds the speculation for a batch from its own state."""
