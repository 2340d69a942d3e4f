import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The Triton kernels run under Triton's interpreter on CPU tensors where there is no GPU (the variable must be set
# before any kernel module is imported: Triton reads it when a kernel is defined). Subprocesses inherit it.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


# `make test-fast` (the edit loop) runs `-m "not slow"`; `make test` (and CI) runs everything. Slow: Ray, the
# server, tensor-parallel ranks and the AMX build (subprocesses, other processes), the job-command files (each test a
# `tokenmill` process on SmolLM2), the benchmark smoke runs, the kernels' portable build, and the single tests that
# took over 5 s in a `pytest --durations=0` run of the whole suite at 0aebae9 (2 cores, Intel Xeon); a new test is
# fast until marked.
SLOW_FILES = {
    "tests/distributed/test_ray_jobs.py", "tests/model/test_tensor_parallel.py", "tests/model/test_amx.py",
    "tests/jobs/test_run_job.py", "tests/jobs/test_new_user_report.py", "tests/jobs/test_faults.py",
    "tests/jobs/test_score_job.py", "tests/jobs/test_samples_job.py", "tests/embed/test_embed_job.py",
    "tests/structured/test_structured_job.py", "tests/test_bench_smoke.py", "tests/model/test_gguf_archs.py",
}
SLOW_DIRS = ("tests/serve/",)
SLOW_TESTS = {
    "tests/model/test_parity.py::test_smollm2_alone",
    "tests/model/test_parity.py::test_smollm2_in_busy_batch_with_chunks_and_preemption",
    "tests/model/test_quant_gguf.py::test_a_q8_0_model_loads_its_blocks_without_rounding",
    "tests/distributed/test_fleet.py::test_plan_deadline_cli",
    "tests/model/test_quant.py::test_quantized_job_and_eval_commands",
    "tests/model/test_quant.py::test_smollm2_quality_gates",
    "tests/model/test_quant.py::test_dummy_weights_at_a_config_only_directory",
    "tests/jobs/test_fuzz.py::test_run_and_validate_processes_on_fuzzed_files",
    "tests/jobs/test_fuzz.py::test_embed_process_on_fuzzed_files",
    "tests/embed/test_index.py::test_index_builds_and_reports_recall",
    "tests/embed/test_embed_parity.py::test_minilm_matches_sentence_transformers",
    "tests/model/test_eval.py::test_the_eval_command",
    "tests/model/test_lora.py::test_a_job_picks_each_rows_adapter_and_reports_an_unknown_one",
    "tests/model/test_kv_cache_dtype.py::test_the_eval_command_measures_the_fp8_cache_on_smollm2",
    "tests/model/test_kv_cache_dtype.py::test_a_resume_with_another_kv_cache_dtype_is_refused",
    "tests/structured/test_structured.py::test_recompute_preemption_and_prefix_caching_give_the_same_outputs",
    "tests/structured/test_structured.py::test_json_schema_outputs_validate_alone_and_in_a_busy_batch",
    "tests/structured/test_structured.py::test_choice_regex_grammar_and_json_object",
    "tests/structured/test_structured.py::test_seeded_sampling_is_constrained_and_reproducible",
    "tests/e2e/test_llm_api.py::test_sort_by_length_and_prefill_first_give_the_same_greedy_tokens",
    "tests/model/test_triton_kernels.py::test_tiny_models_through_the_triton_path_equal_transformers_and_the_cpu_path",
    # 2026-12-06 (over 5 s, or tensor-parallel ranks): LoRA through the interpreted Triton family and with two ranks
    "tests/model/test_lora.py::test_adapters_through_the_triton_family_equal_peft",
    "tests/model/test_lora.py::test_adapters_with_two_ranks_equal_one",
    "tests/model/test_lora.py::test_phi3_adapters_of_its_fused_layers_equal_peft",
    "tests/model/test_lora.py::test_the_plan_command_takes_adapters",  # three `tokenmill plan` processes
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path, _, name = item.nodeid.partition("::")
        portable = "x86-64-v3" in name  # the kernels' portable build (tests/model/conftest.py): a minute to compile
        if (path in SLOW_FILES or path.startswith(SLOW_DIRS) or f"{path}::{name.split('[')[0]}" in SLOW_TESTS
                or portable):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def xdg_cache_home(tmp_path_factory):
    """A private XDG cache for the session, so tests also cover the first (converting) load of the GGUF file;
    subprocesses get it through XDG_CACHE_HOME. The C++ kernels are the exception: built once per machine (by
    `make setup`'s `tokenmill build-kernels`), they are shared with the user's cache rather than rebuilt per session."""
    import os

    xdg = tmp_path_factory.mktemp("xdg-cache")
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenmill" / "kernels"
    user.mkdir(parents=True, exist_ok=True)
    (xdg / "tokenmill").mkdir()
    (xdg / "tokenmill" / "kernels").symlink_to(user, target_is_directory=True)
    return xdg


@pytest.fixture(scope="session")
def cache_dir(xdg_cache_home):
    return str(xdg_cache_home / "tokenmill")


@pytest.fixture(scope="session")
def smollm2(cache_dir):
    """The embedded default model, loaded once for the session (the engine is reused across tests)."""
    from tokenmill import LLM

    return LLM(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own LlamaForCausalLM from the same GGUF file (its own dequantisation and Q/K un-permute)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenmill.model.loader import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def embed_env():
    """Environment for `tokenmill embed` subprocesses."""
    import os

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def cli_env(xdg_cache_home, smollm2):
    """Environment for `tokenmill` subprocesses: the session's model cache (already converted by `smollm2`)."""
    import os

    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(xdg_cache_home)
    env["XDG_DATA_HOME"] = str(xdg_cache_home.parent / "xdg-data")  # a server's default --state-dir
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def minilm():
    """The embedded default embedding model (all-MiniLM-L6-v2), loaded once."""
    from tokenmill.embed.embedder import Embedder

    return Embedder()


@pytest.fixture
def run_cli(cli_env):
    """Runs `tokenmill ARGS` in a subprocess; ``check``: the exit code it must end with."""
    from helpers import tokenmill_cmd

    def run(*args, timeout=300, check=None):
        proc = subprocess.run(tokenmill_cmd(*args), env=cli_env, capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        return proc

    return run
