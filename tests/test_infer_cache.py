"""BoundedCache, the mapping behind infer's module-level caches: bounded, least recently used
entry evicted first."""

import pytest

from numpyro_nnef.infer.cache import BoundedCache


def test_put_beyond_maxsize_evicts_the_least_recently_used():
    cache: BoundedCache[str, int] = BoundedCache(2)
    assert cache.put("a", 1) == 1
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert len(cache) == 2 and "b" not in cache
    assert cache.get("a") == 1 and cache.get("c") == 3
    assert cache.get("b") is None and cache.get("b", 0) == 0


def test_put_overwrites_without_evicting():
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)
    assert len(cache) == 2 and cache.get("a") == 3 and cache.get("b") == 2


def test_maxsize_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        BoundedCache(0)
