"""Pieces every draft algorithm shares: layers, the target head, the config base, HF names."""
