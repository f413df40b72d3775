"""Shared test configuration."""
from hypothesis import settings

# Deterministic and quick: the oracle tests trace and differentiate every drawn model.
settings.register_profile("ci", deadline=None, derandomize=True, max_examples=60)
settings.load_profile("ci")
