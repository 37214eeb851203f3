"""Draft models and their losses; ``capture_spec_for`` / ``get_algorithm`` are the algorithm seam."""

from spec_core.models.algorithm import capture_spec_for, get_algorithm

__all__ = ["capture_spec_for", "get_algorithm"]
