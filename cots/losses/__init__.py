"""Losses as pure functions of tensors (METHOD §3–7)."""
