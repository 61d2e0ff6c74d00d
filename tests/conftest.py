import os

from hypothesis import HealthCheck, settings

# "ci" keeps the suite fast; HYPOTHESIS_PROFILE=thorough runs the property tests 1,000 times each.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# "pure": the pure-Python second run of the unit and simulation tests (tests/test_pure.py).
settings.register_profile("pure", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
