"""Static-shape buckets: a few padded lengths so any prompt or context reuses a compiled program."""
from __future__ import annotations

MIN_BUCKET = 16


def bucket_for(length: int, limit: int) -> int:
    """The smallest power of two >= `length` (at least MIN_BUCKET), capped at `limit`."""
    if length > limit:
        raise ValueError(f"length {length} exceeds the limit {limit}")
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


def all_buckets(limit: int, smallest: int = MIN_BUCKET) -> list[int]:
    """Every bucket `bucket_for` can return up to `limit`, smallest first."""
    out = [smallest]
    while out[-1] < limit:
        out.append(min(out[-1] * 2, limit))
    return [b for b in out if b <= limit]
