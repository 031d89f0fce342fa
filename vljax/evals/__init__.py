"""Evaluation of trained towers: zero-shot finding classification and report retrieval."""
