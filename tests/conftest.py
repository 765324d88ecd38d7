"""Shared fixtures live in tests/fixtures/*; each module there owns one kind of real part."""

pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.chat_templates",
    "tests.fixtures.s3",
    "tests.fixtures.prefect",
    "tests.fixtures.prefect_server",
    "tests.fixtures.ray_cluster",
]
