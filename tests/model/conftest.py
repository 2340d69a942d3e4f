"""Fixtures for the model and kernel tests."""

import platform
from pathlib import Path

import pytest

from tokenmill.kernels import cpu_kernel


@pytest.fixture(scope="session")
def portable_kernels(tmp_path_factory):
    """The kernels built for AVX2 without AVX-512 (``-march=x86-64-v3``): the portable code paths (a struct of AVX
    vectors for vec16, no AVX-512 intrinsics) that this CPU's own build never takes, run here. Skipped off x86-64
    AVX2, and where this CPU lacks AVX-512 (its own build is then the portable one)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() != "x86_64" or " avx2" not in flags:
        pytest.skip("the x86-64-v3 build runs on x86-64 with AVX2")
    if " avx512f" not in flags:
        pytest.skip("this CPU's own build already takes the portable paths")
    return cpu_kernel.build_for_arch("x86-64-v3", tmp_path_factory.mktemp("x86-64-v3"))


@pytest.fixture(params=["native", "x86-64-v3"])
def kernels(request):
    """Every kernel test runs on this machine's build and on the portable one."""
    return cpu_kernel.load() if request.param == "native" else request.getfixturevalue("portable_kernels")
