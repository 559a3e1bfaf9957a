"""Dialogue games: clembench-compatible game masters, players and batched environments (no JAX)."""
