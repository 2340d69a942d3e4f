"""Cost arithmetic, the same as the seeds' ``compute_cost_per_million_tokens``."""


def cost_per_million_tokens(num_gpus: int, hourly_rate: float, throughput: float) -> float:
    """Dollars per million output tokens at ``throughput`` output tokens/s on ``num_gpus`` at ``hourly_rate`` each."""
    total_hourly_cost = num_gpus * hourly_rate
    tokens_per_hour = throughput * 3600
    return (total_hourly_cost / tokens_per_hour) * 1e6 if tokens_per_hour > 0 else float("inf")


def job_cost(num_gpus: int, hourly_rate: float, wall_seconds: float) -> float:
    return num_gpus * hourly_rate * wall_seconds / 3600


def cost_line(num_gpus: int, hourly_rate: float, throughput: float, wall_seconds: float, unit: str) -> str:
    """The summary's cost line: $ per million ``unit`` tokens at ``throughput`` of them per second, and the run's cost."""
    per_m = cost_per_million_tokens(num_gpus, hourly_rate, throughput)
    return (f"  cost: ${per_m:.4f} per million {unit} tokens, ${job_cost(num_gpus, hourly_rate, wall_seconds):.4f} "
            f"for this run ({num_gpus} x ${hourly_rate:.2f}/h)")
