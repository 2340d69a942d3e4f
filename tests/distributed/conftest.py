import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("ray_scenario.py")


def _netns_ok() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare / ip not found"
    p = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    return None if p.returncode == 0 else f"unshare --net failed: {p.stderr.strip()}"


@pytest.fixture(scope="session")
def netns():
    """Ray binds the machine's external interface by default: every Ray test runs in a network namespace of its
    own with only loopback up. A machine that cannot make one (not root, no ``unshare``) skips them, saying why."""
    problem = _netns_ok()
    if problem is not None:
        pytest.skip(f"Ray tests need a private network namespace (run as root): {problem}")


@pytest.fixture
def ray_scenario(netns, cli_env):
    """Runs ``tests/distributed/ray_scenario.py`` (a Ray cluster + a tokenmill job + a fault) in a private network
    namespace; returns its JSON report."""

    def run(output: Path, *job, fault: str = "none", nodes: int = 3, timeout: int = 420) -> dict:
        script = (f"ip link set lo up && exec {sys.executable} {SCENARIO} --nodes {nodes} --fault {fault} "
                  f"--output {output} -- " + " ".join(map(str, job)))
        p = subprocess.run(["unshare", "--net", "sh", "-c", script], env=cli_env, capture_output=True, text=True,
                           timeout=timeout)
        assert p.returncode == 0, f"scenario failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        return json.loads(p.stdout.strip().splitlines()[-1])

    return run
