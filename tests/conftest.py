"""Shared test configuration."""
from hypothesis import settings

# Deterministic and quick: the oracle tests trace and differentiate every drawn model.
settings.register_profile("ci", deadline=None, derandomize=True, max_examples=60)
settings.load_profile("ci")

import torch  # noqa: E402

# The suite runs thousands of tiny float64 convolutions on a 2-core machine that may be shared:
# one intra-op thread is faster there than two fighting over the cores (measured: a convnext
# smallest-tile case took 74 s with 2 threads under load and 2.9 s with 1).
torch.set_num_threads(1)
