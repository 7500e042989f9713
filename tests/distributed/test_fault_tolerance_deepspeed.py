"""The fault-tolerant mode with replicas that are DeepSpeed ZeRO engines of 2 ranks each, on real processes.

Each replica is its own ``torchrun --standalone --nproc_per_node 2`` (its own torch.distributed world, gloo on
loopback) holding one ZeRO engine over both ranks (real DeepSpeed, CPU); PALSGD is bound to the engine
(``FaultTolerantSession.build_algorithm(engine, ...)``), its exchanges go through torchft and a real lighthouse,
rank r of every replica exchanging its fp32 partition r (tests/distributed/scripts/ft_fsdp_replica.py
``--deepspeed STAGE``, a raw DeepSpeed loop). The checks are those of the FSDP2 replicas
(tests/distributed/test_fault_tolerance_fsdp.py), which say what each asserts:

* Default: 2 replicas x ZeRO-3 over 2 ranks, 4 warm-up steps, no failure: one global model, within 1e-5 per value of
  the non-fault-tolerant run (one torchrun of 4 ranks, ZeRO within each replica by PALSGD's mpu, same model, data and
  coins). The bound is the FSDP2 test's: the managed mean is sum(w x_k) / sum(w), one fp32 multiply and divide more
  per value than the plain mean, a few ulps per sync on O(1) values, 10 syncs; the warm-up means are (g_1 + g_2) / 2
  in both. Exactly one managed step per warm-up step and per sync (the warm-up mean runs inside engine.step(), once).
* Slow: the same with ZeRO-2.
* Slow: 3 replicas; the whole of replica 2 (launcher and both ranks) killed mid-period and restarted: the others sync
  without it, both of its ranks rejoin at a later sync with their partition of the others' anchor bit for bit (the
  16-bit weights rebuilt on both ranks together), one global model at the end. ZeRO-2 and ZeRO-3.
* Slow: replica 2 killed during a long warm-up (ZeRO-3): it rejoins inside the warm-up with the others' weights bit
  for bit at every later warm-up step.
* Default, through ``FaultTolerantTrainer`` with ``deepspeed=recipes/deepspeed/zero3.json`` (ft_fsdp_trainer_replica.py
  ``--deepspeed 3``): 2 replicas x 2 ranks with 4 warm-up steps end with one global model (the FSDP2 Trainer test's
  checks) after exactly one managed step per warm-up step and per sync. Slow: the Trainer's whole-replica kill and
  rejoin.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchft")
pytest.importorskip("deepspeed")

from tests.distributed.test_fault_tolerance_fsdp import (  # noqa: E402
    kill_and_rejoin,
    kill_during_warm_up_and_rejoin,
    two_sharded_replicas_match_the_reference,
)
from tests.distributed.test_fault_tolerance_fsdp_trainer import H as TRAINER_H  # noqa: E402
from tests.distributed.test_fault_tolerance_fsdp_trainer import SCRIPT as TRAINER_SCRIPT  # noqa: E402
from tests.distributed.test_fault_tolerance_fsdp_trainer import STEPS, run_two_replicas  # noqa: E402
from tests.helpers.ft_cluster import Cluster  # noqa: E402


@pytest.mark.timeout(360)
def test_two_zero3_replicas_warm_up_and_match_the_fault_free_run(tmp_path):
    two_sharded_replicas_match_the_reference(tmp_path, "--deepspeed", "3", warmup=4)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_two_zero2_replicas_warm_up_and_match_the_fault_free_run(tmp_path):
    two_sharded_replicas_match_the_reference(tmp_path, "--deepspeed", "2", warmup=4)


def restart(ft: Cluster) -> tuple[float, float]:
    killed_at = ft.kill(2)
    return killed_at, ft.start(2)


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("stage", ["2", "3"])
def test_kill_a_whole_zero_replica_and_rejoin_per_partition(tmp_path, stage):
    kill_and_rejoin(tmp_path, restart, extra=("--deepspeed", stage))


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_kill_a_whole_zero3_replica_during_warm_up_and_rejoin(tmp_path):
    kill_during_warm_up_and_rejoin(tmp_path, "--deepspeed", "3")


@pytest.mark.timeout(240)
def test_trainer_with_two_zero3_replicas_warms_up_and_ends_with_one_global_model(tmp_path):
    """``FaultTolerantTrainer`` with ``deepspeed=recipes/deepspeed/zero3.json`` in each replica of 2 ranks: every sync
    has both replicas, one global model at the end (per partition the same anchor on both, every rank's weights equal
    to it, both replicas save the same model file), its eval loss below half the initial one."""
    results = run_two_replicas(tmp_path, warmup=4, both=("--deepspeed", "3"))
    assert all(r["ft"]["managed_steps"] == 1 + 4 + (STEPS - 4) // TRAINER_H for r in results), results
    print(f"\nFaultTolerantTrainer x ZeRO-3 (2 replicas x 2 ranks): eval loss {results[0]['initial_eval_loss']:.5g} "
          f"-> {results[0]['eval_loss']:.8g}")


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_trainer_kill_a_whole_zero3_replica_and_rejoin(tmp_path):
    kill_and_rejoin(tmp_path, restart, script=TRAINER_SCRIPT, extra=("--deepspeed", "3"))
