"""Which tests the quick set leaves out: the tables tests/conftest.py marks by.

`bash scripts/test.sh` runs `pytest -m "not full"`: every test module's basic promise in
2-3 minutes on 2 cores. `bash scripts/test.sh --all` (CI, .ci/run) runs everything.
A test is marked `full` (only under --all) when it is marked `slow` or matches a pattern
of FULL_ONLY, unless it matches QUICK_ALSO. Patterns are fnmatch patterns on the node id
(path from the repository root, "::", the test's name with its parameters), so they
follow a test by name, not by line; a new test is in the quick set unless it is slow.
tests/test_quick_set.py checks that every pattern still names a test.
"""

from __future__ import annotations

import fnmatch

FULL_ONLY = (
    # the long fault matrix: each case waits out a (short) collective timeout; the quick
    # set keeps the prompt fault checks and one timeout case (QUICK_ALSO)
    "tests/test_faults.py::test_dead_rank_makes_the_survivors_raise_promptly",
    "tests/test_faults.py::test_size_mismatch_in_default_mode_aborts_a_rank_and_the_others_raise",
    "tests/test_faults.py::test_skipped_layer_raises_on_the_waiting_rank*",
    "tests/test_faults.py::test_call_count_mismatch_in_default_mode_times_out_on_the_extra_call",
    "tests/test_faults.py::test_one_rank_in_eval_is_a_timeout_naming_the_layer*",
    "tests/test_abort.py::test_process_exits_promptly_after_the_error[[]stall]",
    "tests/test_harness.py::test_hang_fails_within_the_timeout",
    "tests/test_join.py::test_layer_skipped_in_the_last_step_is_an_error_on_every_rank*",
    # CLI end-to-end runs in subprocesses (the in-process CLI tests stay quick)
    "tests/test_cli_demo.py::test_demo_bad_input_exits_2_with_message*",
    "tests/test_cli_check.py::test_torchrun_itself_refuses_nproc_as_ambiguous",
    # more ranks of a case whose 2-rank version is quick
    "tests/paddle/test_sync_paddle.py::test_sync_matches_paddle_formula_on_global_batch[[]3-*",
)
QUICK_ALSO = (
    # one compile case: torch.compile(model, fullgraph=True) on 2 ranks equals eager BN
    "tests/test_compile.py::test_compiled_training_equals_eager_batchnorm_on_the_global_batch"
    "[[]compile]",
    "tests/test_faults.py::test_skipped_layer_raises_on_the_waiting_rank[[]layer-timeout]",
    # one launcher case: spawned ranks and their exit codes
    "tests/test_launch.py::test_spawn_returns_each_ranks_code",
)


# The version-matrix legs (scripts/test_oldest.sh, scripts/test_newest.sh) run
# `pytest -m "not full or matrix"`: the quick set, plus these full-only tests that tell
# torch releases apart (marked `matrix`).
MATRIX_ALSO = (
    # compiled training where one rank's batch is empty: torch 2.9 mispairs its collectives
    "tests/test_compile.py::test_compiled_training_with_an_empty_rank",
)


def matches(nodeid: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``nodeid`` matches one of ``patterns``."""
    return any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in patterns)
