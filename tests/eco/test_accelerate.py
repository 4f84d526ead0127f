"""accelerate: convert before ``prepare``; 2 CPU ranks equal one process on the global batch.

Real accelerate, its ``debug_launcher`` (2 forked CPU ranks, gloo), run in a fresh
Python by ``accelerate_parity.py`` and killed with its ranks if it overruns.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trainer_helpers as th

pytest.importorskip("accelerate", reason="needs accelerate: pip install 'syncbn[accelerate]'")

SCRIPT = th.HERE / "accelerate_parity.py"


@pytest.mark.slow
def test_accelerate_recipe_matches_one_process_on_the_global_batch(tmp_path: Path) -> None:
    th.run_script([str(SCRIPT), str(tmp_path)], timeout_s=180, env=th.loopback_env())
    data = th.dataset(torch.float64)
    # accelerate's sharding: step t takes the loader's batches 2t (rank 0) and 2t + 1 (rank 1)
    global_batch = th.WORLD_SIZE * th.PER_RANK
    batches = [list(range(start, start + global_batch))
               for start in range(0, th.N_SAMPLES, global_batch)] * 2
    reference = th.train_reference(th.build_net(torch.float64), data, batches).state_dict()
    untrained = th.build_net(torch.float64).state_dict()
    for rank in range(th.WORLD_SIZE):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["classes_in_training"] == ["SyncBatchNorm", "SyncBatchNorm"]
        assert saved["classes_after"] == ["BatchNorm2d", "BatchNorm1d"]
        th.assert_same_state(saved["state"], reference, atol=1e-12, rtol=1e-10,
                             label=f"rank {rank}")
        assert not torch.equal(saved["state"]["0.weight"], untrained["0.weight"])
