"""The allocator's runtime error (a layout that cannot work is `spec.CacheConfigError`)."""


class CacheError(RuntimeError):
    """Misuse of the cache manager (unknown request, committing unallocated tokens, ...)."""
