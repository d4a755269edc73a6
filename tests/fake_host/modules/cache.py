"""Fake `modules.cache`: in-memory caches."""

caches: dict = {}


def cache(subsection):
    return caches.setdefault(subsection, {})


def dump_cache():
    pass


def cached_data_for_file(subsection, title, filename, func):
    return func()
