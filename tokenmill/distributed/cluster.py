"""Connecting to a Ray cluster: Ray imported lazily (an optional extra), a wrong address refused at once."""

from __future__ import annotations

from tokenmill.jobs.errors import JobSetupError


def import_ray():
    try:
        import ray
    except ImportError:
        raise JobSetupError("--ray needs Ray: pip install 'tokenmill[ray]'") from None
    return ray


def connect(address: str):
    """ray.init for ``address``; returns the ray module."""
    ray = import_ray()
    _check_reachable(address)
    kwargs = dict(log_to_driver=False, include_dashboard=False, logging_level="ERROR", configure_logging=True)
    try:
        if address == "local":
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise JobSetupError(f"cannot connect to the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return ray


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT address that nothing answers on is an error now, not minutes of Ray's connection retries."""
    import socket

    if address in ("local", "auto") or address.startswith("ray://") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise JobSetupError(f"cannot connect to the Ray cluster at {address!r}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
