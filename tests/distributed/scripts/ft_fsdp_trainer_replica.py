"""One rank of a fault-tolerant replica trained by ``FaultTolerantTrainer`` on an FSDP2 model or with DeepSpeed ZeRO
(tests/distributed/test_fault_tolerance_fsdp_trainer.py, test_fault_tolerance_deepspeed.py).

Launched per replica as ``torchrun --standalone --nproc_per_node S ft_fsdp_trainer_replica.py --replica r ...``:
``PALSGDTrainingArguments(palsgd_shard_size=S)`` start the replica's world, ``shard_model(model, S)`` shards one
model copy over its ranks (the non-fault-tolerant FSDP2 Trainer path), and the Trainer's exchanges go through
torchft (rank r of every replica). ``--no-ft``: the same model, data and settings through ``PALSGDTrainer`` in one
torchrun of R x S ranks, the reference. ``--deepspeed STAGE``: the model is not sharded beforehand; the arguments
take ``deepspeed=recipes/deepspeed/zero<STAGE>.json`` and ZeRO shards it over the replica's ranks (the reference:
within each replica of S ranks, PALSGD's mpu).

Data: a regression task whose sample i is drawn from a generator seeded by i. Accelerate deals batch j of a
rank's world to rank j % world (sequential sampling), so replica r of the fault-tolerant run reads, in its
batch j, global batch R*S*(j // S) + S*r + j % S: each rank reads at each step what the same rank of the
reference reads. Events (joined, every sync: step, replicas, sha256 of this rank's anchor shard) go to
``events_<replica>_<rank>.jsonl``; at the end ``result_<replica>_<rank>_<pid>.json`` (``rank<R>.json`` with
``--no-ft``): anchor and weight shards, their sha256, the eval loss before and after training, the sha256 of
the saved global model.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import TrainerCallback

from ft_trainer_data import EVAL_OFFSET, MICRO, Regressor, Samples, sha
from palsgd_hf.integrations.fsdp_trainer import shard_model
from palsgd_hf.integrations.trainer import PALSGDTrainer
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "deepspeed"


class Events(TrainerCallback):
    """Joined / sync events of this rank; the stop file lowers max_steps (every rank reads the same value)."""

    def __init__(self, args, where: tuple[int, int], started: float):
        self.args, (self.replica, self.shard), self.started = args, where, started
        self.trainer, self.syncs = None, 0
        self.stop = Path(args.stop_file) if args.stop_file else None
        self.file = (Path(args.out) / f"events_{self.replica}_{self.shard}.jsonl").open("a", buffering=1)

    def event(self, kind: str, **extra) -> None:
        algo, session = self.trainer.palsgd, getattr(self.trainer, "session", None)
        line = {"kind": kind, "t": time.time(), "pid": os.getpid(), "launcher": os.getppid(), "step": algo.step,
                "participants": session.comm.participants if session else self.args.replicas, **extra}
        if algo.in_local_phase:
            line["anchor"] = sha(algo.state_dict()["anchor"]["tensors"])
        self.file.write(json.dumps(line) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        algo, session = self.trainer.palsgd, getattr(self.trainer, "session", None)
        self.syncs = algo.counters["outer_syncs"]
        if session is not None:
            self.event("joined", rejoined=session.transfer.received > 0 and algo.step > 0,
                       seconds=time.time() - self.started, global_step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        algo = self.trainer.palsgd
        if algo.counters["outer_syncs"] != self.syncs:
            self.syncs = algo.counters["outer_syncs"]
            self.event("sync")
        if self.stop is not None and self.stop.exists():
            state.max_steps, self.stop = int(self.stop.read_text()), None
        if self.args.step_seconds:
            time.sleep(self.args.step_seconds)


def refusals(args, training_args, model, session) -> list[str]:
    """The messages of the FaultTolerantTrainers this replica must refuse when they are built (no training):
    an unsharded model on several ranks (accelerate would wrap it in DDP)."""
    from dataclasses import replace

    from palsgd_hf.config import PALSGDConfigError
    from palsgd_hf.fault_tolerance.trainer import FaultTolerantTrainer

    cases = [(Regressor(), replace(training_args, palsgd_shard_size=1))]
    messages = []
    for candidate, candidate_args in cases:
        try:
            FaultTolerantTrainer(model=candidate, args=candidate_args, train_dataset=Samples(8), session=session)
        except PALSGDConfigError as err:
            messages.append(str(err))
    return messages


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--lighthouse", default=None)
    p.add_argument("--replica", type=int, default=0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--sync-interval", type=int, default=4)
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (with FT: one exchange each)")
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--stop-file", default=None, help="when it appears, it holds the step to end at (all agree)")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--quorum-timeout", type=float, default=60.0)
    p.add_argument("--coins", default="shared", choices=["shared", "per_replica"])
    p.add_argument("--same-init", action="store_true", help="every replica from seed 0 (as the reference)")
    p.add_argument("--check-refusals", action="store_true", help="first build the Trainers it must refuse")
    p.add_argument("--deepspeed", type=int, default=0, help="ZeRO stage inside each replica (0: FSDP2)")
    p.add_argument("--no-ft", action="store_true", help="the non-fault-tolerant reference: R x S ranks, one torchrun")
    return p.parse_args()


@torch.no_grad()
def eval_loss(model: torch.nn.Module) -> float:
    """The eval loss of a model that is not trained yet (HF + DeepSpeed cannot evaluate before train())."""
    samples = [Samples(32, offset=EVAL_OFFSET)[i] for i in range(32)]
    x, y = torch.stack([s["x"] for s in samples]), torch.stack([s["labels"] for s in samples])
    return float(model(x, labels=y)["loss"])


def main() -> None:
    args = parse()
    faulthandler.dump_traceback_later(240, exit=False)  # a hang shows where in the log, before the test's deadline
    started = time.time()
    ranks = int(os.environ["WORLD_SIZE"])
    shards = ranks // args.replicas if args.no_ft else ranks
    out = Path(args.out)
    training_args = PALSGDTrainingArguments(
        output_dir=str(out / f"trainer_{args.replica}"), max_steps=args.steps, per_device_train_batch_size=MICRO,
        per_device_eval_batch_size=8, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, logging_steps=args.sync_interval, report_to="none", save_strategy="no", seed=0,
        train_sampling_strategy="sequential", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        prediction_loss_only=True, ddp_timeout=int(args.timeout),
        palsgd_sync_interval=args.sync_interval, palsgd_pseudo_sync_prob=0.3, palsgd_warmup_steps=args.warmup,
        palsgd_mixing_rate=1.0, palsgd_outer_lr=0.7, palsgd_outer_momentum=0.5, palsgd_seed=3,
        palsgd_shard_size=shards, palsgd_coins=args.coins,
        deepspeed=str(RECIPES / f"zero{args.deepspeed}.json") if args.deepspeed else None,
    )  # starts this replica's torch.distributed world (gloo)
    rank = dist.get_rank()
    replica, shard = (rank // shards, rank % shards) if args.no_ft else (args.replica, rank)
    logging.basicConfig(level=logging.INFO, format=f"[replica {replica}/{shard} %(asctime)s] %(name)s: %(message)s")
    # By default replicas start from different weights (join() makes them identical); --same-init: seed 0, as the
    # reference.
    torch.manual_seed(0 if args.no_ft or args.same_init else 17 * replica)
    model = Regressor() if args.deepspeed else shard_model(Regressor(), shards)
    initial_loss = eval_loss(model) if args.deepspeed else None
    length = MICRO * shards * min(args.steps, 100_000)
    train = Samples(length * (args.replicas if args.no_ft else 1), None if args.no_ft else replica, args.replicas,
                    shards)
    events = Events(args, (replica, shard), started)
    common = dict(model=model, args=training_args, train_dataset=train, eval_dataset=Samples(32, offset=EVAL_OFFSET),
                  callbacks=[events])
    session, refused = None, []
    if args.no_ft:
        trainer = PALSGDTrainer(**common)
    else:
        from palsgd_hf.fault_tolerance import FaultToleranceConfig, FaultTolerantSession
        from palsgd_hf.fault_tolerance.trainer import FaultTolerantTrainer

        session = FaultTolerantSession(FaultToleranceConfig(
            lighthouse=args.lighthouse, replica_id=replica, replicas=args.replicas, min_replicas=2,
            timeout_seconds=args.timeout, quorum_timeout_seconds=args.quorum_timeout))
        refused = refusals(args, training_args, model, session) if args.check_refusals else []
        trainer = FaultTolerantTrainer(**common, session=session)
    events.trainer = trainer
    if initial_loss is None:
        initial_loss = trainer.evaluate()["eval_loss"]  # before training (no PALSGD yet: the model as built)
    events.started = time.time()  # "joined" reports the seconds from train() to the first step (prepare + join)
    trainer.train()  # ends with PALSGD's finalize: every rank holds its shard of the global model
    algo = trainer.palsgd
    anchor = algo.state_dict()["anchor"]["tensors"]
    owned = [t for g in algo.adapter.owned_groups() for t in g.tensors]
    result = {"replica": replica, "shard": shard, "step": algo.step, "global_step": trainer.state.global_step,
              "anchor": sha(anchor), "weights": sha(owned),
              "anchor_values": torch.cat([t.reshape(-1) for t in anchor]).tolist(),
              "ft": session.metrics() if session else {}, "counters": dict(algo.counters),
              "eval_loss": trainer.evaluate()["eval_loss"], "initial_eval_loss": initial_loss, "refused": refused}
    saved = out / ("model" if args.no_ft else f"model_{replica}")  # the reference: its rank 0 writes
    trainer.save_model(str(saved))  # collective within the replica; its main process writes
    dist.barrier()
    if shard == 0:
        state = load_file(str(saved / "model.safetensors"))
        result["saved"] = sha(state[k] for k in sorted(state))
    name = f"rank{rank}.json" if args.no_ft else f"result_{replica}_{shard}_{os.getpid()}.json"
    (out / name).write_text(json.dumps(result))
    events.file.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
