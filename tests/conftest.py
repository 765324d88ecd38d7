"""Shared fixtures live in tests/fixtures/*; each module there owns one kind of real part."""

pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.chat_templates",
    "tests.fixtures.s3",
    "tests.fixtures.prefect",
    "tests.fixtures.prefect_server",
    "tests.fixtures.ray_cluster",
]


def pytest_collection_modifyitems(items):
    """The modules with a test marked `ray` run last, in their order: the session's Ray cluster then
    starts when they begin and never idles beside other modules (its two idle nodes take about 7%
    of a core, and the rest of the suite needs both cores). Whole modules move, so that no
    module-scoped fixture is set up twice."""
    on_ray = {getattr(item, "module", None) for item in items if item.get_closest_marker("ray")}
    items.sort(key=lambda item: getattr(item, "module", None) in on_ray)
