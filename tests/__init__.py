"""The test suite (a package, so `from tests.helpers import ...` works under both `pytest`
and `python -m pytest`)."""
