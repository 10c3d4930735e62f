"""Shared settings of the unit tests: hypothesis profiles.

The default ``ci`` profile only lifts the per-example deadline, which a loaded
CI machine would otherwise trip at random; ``QSNAP_HYPOTHESIS_PROFILE=thorough``
runs twenty times more examples.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", deadline=None, suppress_health_check=_QUIET)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=_QUIET
)
settings.load_profile(os.environ.get("QSNAP_HYPOTHESIS_PROFILE", "ci"))
