"""Locust load tests and their headless runner (``python -m load_tests.run``)."""
