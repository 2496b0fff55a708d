"""Reference statistics; the cache row layout (`cache_rows`, `item_field`) is public here."""

from fpo.reference.store import SIDES, cache_rows, item_field

__all__ = ["SIDES", "cache_rows", "item_field"]
