"""Losses as pure functions of tensors (DESIGN §3–7)."""
