"""Is Redis fit to hold our work? Reachable, not evicting, evictions never happened."""

from __future__ import annotations

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError


def describe_problem(memory: dict, stats: dict) -> str | None:
    """Why a Redis described by ``INFO memory`` and ``INFO stats`` would lose work, or None."""
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        return f"maxmemory-policy is {policy}, must be noeviction"
    evicted = int(stats.get("evicted_keys", 0) or 0)
    if evicted > 0:
        return f"Redis has evicted {evicted} keys"
    return None


async def redis_problem(redis: AsyncRedis) -> str | None:
    try:
        memory = await redis.info("memory")
        stats = await redis.info("stats")
    except (RedisError, OSError):
        return "unreachable"
    return describe_problem(memory, stats)
