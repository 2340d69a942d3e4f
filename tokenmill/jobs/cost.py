"""Cost arithmetic, the same as the seeds' ``compute_cost_per_million_tokens``."""


def cost_per_million_tokens(num_gpus: int, hourly_rate: float, throughput: float) -> float:
    """Dollars per million output tokens at ``throughput`` output tokens/s on ``num_gpus`` at ``hourly_rate`` each."""
    total_hourly_cost = num_gpus * hourly_rate
    tokens_per_hour = throughput * 3600
    return (total_hourly_cost / tokens_per_hour) * 1e6 if tokens_per_hour > 0 else float("inf")


def job_cost(num_gpus: int, hourly_rate: float, wall_seconds: float) -> float:
    return num_gpus * hourly_rate * wall_seconds / 3600
