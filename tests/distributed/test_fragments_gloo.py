"""Fragment (streaming) syncs on real torch.distributed process groups (gloo), against the float64 reference.

The float64 linear-regression run of tests/distributed/scripts/overlap_run.py, with ``--fragments``: the
peer groups exchange one fragment at a time (asynchronously with overlap), int8 with its per-fragment
residuals, 2 replicas x 2 ranks, and a checkpoint taken while a fragment's average is in flight. The
weights must follow tests/unit/test_fragments.py's reference, and the bytes are counted exactly.
"""

from __future__ import annotations

import pytest

from palsgd_hf import PALSGDConfig
from tests.distributed.test_overlap_gloo import assert_runs_match_reference
from tests.helpers.launch import torchrun
from tests.unit.test_fragments import reference


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc,shard_size,comm_dtype,overlap,resume_at", [
    # H = 8, F = 2: fragment 1 at counts 4, 12; fragment 0 at 8, 16. With d = 1, the launch at 8 lands at 9.
    pytest.param(2, 1, "fp32", 0, None, id="2proc-fp32", marks=pytest.mark.slow),  # the unit test covers fp32
    pytest.param(4, 2, "int8", 1, 8, id="4proc-2replicas-int8-d1-resume-in-flight"),
])
def test_fragments_on_gloo_match_the_float64_reference(tmp_path, nproc, shard_size, comm_dtype, overlap, resume_at):
    steps, H, F = 19, 8, 2
    cfg = PALSGDConfig(sync_interval=H, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=2, overlap_steps=overlap,
                       comm_dtype=comm_dtype, fragments=F)
    args = ["--H", str(H), "--p", "0.3", "--eta", "2.0", "--warmup", "2", "--steps", str(steps), "--overlap",
            str(overlap), "--comm-dtype", comm_dtype, "--shard-size", str(shard_size), "--fragments", str(F)]
    if resume_at is not None:
        args += ["--resume-at", str(resume_at)]
    results = torchrun("overlap_run.py", nproc, tmp_path, *args)
    assert_runs_match_reference(results, cfg, nproc // shard_size, steps, rule=reference)
    if resume_at is not None:
        assert all(r["in_flight_at_save"] for r in results)
    # Bytes before finalize: 2 warm-up all-reduces and replica 0's broadcast (float64, 6 values = 48 bytes each);
    # 4 fragment syncs of 3 values (fp32 run: float64 anchors, 24 bytes; int8: one 256-value block + a 4-byte
    # scale per chunk message, 2 x 260 bytes); with shards, a 4-byte finite flag per applied fragment sync.
    per_sync = {"fp32": 3 * 8, "int8": 2 * 260}[comm_dtype]
    syncs = results[0]["metrics"]["outer_syncs"]
    assert syncs == 4  # launched at counts 4, 8, 12, 16 (with d = 1 the last lands at 17 < 19)
    for r in results:
        expected = 2 * 48 + (48 if r["replica"] == 0 else 0) + 4 * per_sync + (4 * 4 if shard_size > 1 else 0)
        assert r["metrics"]["comm_bytes"] == expected
