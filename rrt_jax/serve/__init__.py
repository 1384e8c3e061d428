"""Serving: KV-cached generation with per-token early exit."""
