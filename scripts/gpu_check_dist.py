"""Worker of scripts/gpu_check.py's two-process checks, one rank per process (launched by torchrun).

Modes:

* ``wrap``: DDP + ``palsgd_hf.wrap_optimizer`` in a plain loop, p > 0, in two phases (blocking
  fp32 syncs; overlapped syncs with bf16 on the wire). Every tensor handed to a
  ``torch.distributed`` collective from Python (PALSGD's own, and DDP's gradient buckets through
  PALSGD's counting hook) is recorded with its device; one on another device than the model's is
  reported (NCCL would refuse it).
* ``compile``: ``PALSGDTrainer`` with ``torch_compile=True`` on 2 ranks (issue 11, item 2).

Placement: with >= 2 GPUs each rank takes its own GPU and NCCL; with one GPU both ranks share
``cuda:0`` over gloo (NCCL refuses two ranks on one device; gloo moves CUDA tensors through host
memory); on CPU, gloo. Each rank writes rank{R}.json (and rank{R}_<phase>.pt, its final weights).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_cases as cases  # noqa: E402  (sets sys.path and cache variables too)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TIMEOUT = timedelta(seconds=90)
AUDITED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
           "all_to_all_single", "reduce_scatter_tensor", "all_reduce_coalesced", "reduce", "gather", "scatter")


def placement(device: str) -> tuple[str, torch.device]:
    """(backend, this rank's device); see the module docstring."""
    if device == "cpu":
        return "gloo", torch.device("cpu")
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.device_count() >= 2:
        return "nccl", torch.device("cuda", local)
    return "gloo", torch.device("cuda", 0)


class CollectiveAudit:
    """Wraps torch.distributed's collectives: counts calls and the devices of their tensor arguments."""

    def __init__(self, expected: torch.device):
        self.expected = expected.type
        self.calls = 0
        self.wrong: set[str] = set()
        for name in AUDITED:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def audited(*args, **kwargs):
            self.calls += 1
            for value in list(args) + list(kwargs.values()):
                tensors = value if isinstance(value, (list, tuple)) else [value]
                for t in tensors:
                    if isinstance(t, torch.Tensor) and t.device.type != self.expected:
                        self.wrong.add(f"{name}({t.device.type} {t.dtype} {tuple(t.shape)})")
            return fn(*args, **kwargs)

        return audited

    def reset(self) -> None:
        self.calls, self.wrong = 0, set()


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def run_wrap(args, device: torch.device, rank: int, out: Path) -> dict:
    audit = CollectiveAudit(device)
    blocks, vocab, source = cases.token_blocks(2 * args.steps * 4 + 8)
    phases = {}
    for name, extra in (("blocking_fp32", {}), ("overlap2_bf16", {"overlap_steps": 2, "comm_dtype": "bf16"})):
        audit.reset()
        try:
            phases[name] = wrap_phase(args, device, rank, out / f"rank{rank}_{name}.pt", blocks, vocab, extra)
        except Exception as err:
            # Both ranks usually fail alike (an operation the backend lacks for CUDA tensors, say): record it and
            # go on, so that one phase's failure does not hide the other's result. A one-sided failure leaves
            # the other rank waiting: the collective timeout or the check's own timeout ends it.
            phases[name] = {"error": f"{type(err).__name__}: {err}"[:800], "traceback": traceback.format_exc()[-2000:]}
        phases[name].update(collectives=audit.calls, wrong_device_calls=sorted(audit.wrong))
    return {"phases": phases, "data": source}


def wrap_phase(args, device: torch.device, rank: int, weights_file: Path, blocks, vocab: int, extra: dict) -> dict:
    """One training run of DDP + wrap_optimizer; saves the final weights to ``weights_file``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from palsgd_hf import PALSGDConfig, StepKind, wrap_optimizer

    model = cases.tiny_model(vocab).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    config = PALSGDConfig(sync_interval=cases.SYNC_INTERVAL, pseudo_sync_prob=cases.P, warmup_steps=cases.WARMUP,
                          mixing_rate=1.0, **extra)
    optimizer = wrap_optimizer(ddp, torch.optim.AdamW(ddp.parameters(), lr=3e-3), config, comm_timeout=TIMEOUT)
    losses = []
    for step in range(args.steps):
        # Each rank reads its own batches (rank-strided), as a distributed sampler would.
        ids = torch.stack([blocks[(2 * (step * 4 + i) + rank) % len(blocks)] for i in range(4)]).to(device)
        if optimizer.algorithm.step_kind() is not StepKind.PSEUDO_SYNC:
            loss = ddp(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    optimizer.algorithm.finalize()
    torch.save(flat(model), weights_file)
    return {"metrics": optimizer.algorithm.metrics(), "loss_first": losses[0], "loss_last": losses[-1]}


def run_compile(args, device: torch.device, rank: int, out: Path) -> dict:
    from transformers import TrainerCallback

    from palsgd_hf import PALSGDTrainer, PALSGDTrainingArguments

    blocks, vocab, source = cases.token_blocks(2 * args.steps * 4 + 8)
    counted = {"ddp_allreduces_local_phase": 0, "local_steps_with_ddp_sync_on": 0, "ddp_found": False}

    class WatchDDP(TrainerCallback):
        """After warm-up, DDP's gradient all-reduce must be off: checked on DDP's own switch after every
        local step and, when nobody else hooked DDP (PALSGD did not recognize it), by counting its buckets."""

        def on_train_begin(self, args_, state, control, **kwargs):
            ddp = find_ddp(trainer.model_wrapped)
            counted["ddp_found"] = ddp is not None
            if ddp is None:
                return

            def hook(_state, bucket):
                if trainer.palsgd is not None and trainer.palsgd.step >= cases.WARMUP:
                    counted["ddp_allreduces_local_phase"] += 1
                tensor = bucket.buffer().div_(dist.get_world_size())
                return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

            try:
                ddp.register_comm_hook(None, hook)
            except RuntimeError:
                counted["hook"] = "another comm hook (PALSGD's byte counter) is installed: PALSGD found DDP"

        def on_step_end(self, args_, state, control, **kwargs):
            ddp = find_ddp(trainer.model_wrapped)
            if ddp is not None and state.global_step > cases.WARMUP and ddp.require_backward_grad_sync:
                counted["local_steps_with_ddp_sync_on"] += 1

    with tempfile.TemporaryDirectory() as run_dir:
        training_args = PALSGDTrainingArguments(
            output_dir=run_dir, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=3e-3,
            lr_scheduler_type="constant", logging_steps=4, report_to="none", seed=0, save_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True, use_cpu=device.type == "cpu",
            ddp_backend=dist.get_backend(), torch_compile=True, torch_compile_backend=args.compile_backend,
            palsgd_sync_interval=cases.SYNC_INTERVAL, palsgd_pseudo_sync_prob=cases.P,
            palsgd_warmup_steps=cases.WARMUP, palsgd_mixing_rate=1.0, palsgd_comm_timeout_seconds=60,
        )
        trainer = PALSGDTrainer(model=cases.tiny_model(vocab), args=training_args,
                                train_dataset=cases.BlockDataset(blocks), callbacks=[WatchDDP()])
        trainer.train()
        torch.save(flat(trainer.model), out / f"rank{rank}_final.pt")
        return {**counted, "metrics": trainer.palsgd.metrics(), "data": source,
                "model_wrapped": type(trainer.model_wrapped).__name__}


def find_ddp(model):
    from torch.nn.parallel import DistributedDataParallel as DDP

    seen = model
    for _ in range(4):  # OptimizedModule(DDP(...)) and similar wrappers
        if isinstance(seen, DDP):
            return seen
        seen = getattr(seen, "_orig_mod", None) or getattr(seen, "module", None)
        if seen is None:
            return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("wrap", "compile"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--compile-backend", default="aot_eager")
    args = ap.parse_args()
    out = Path(args.out)
    rank = int(os.environ["RANK"])
    backend, device = placement(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if backend == "gloo":
            # accelerate takes the device from LOCAL_RANK (cuda:1 does not exist on one GPU): both ranks use cuda:0.
            os.environ["LOCAL_RANK"] = "0"
    dist.init_process_group(backend, timeout=TIMEOUT)
    result = {"rank": rank, "backend": backend, "device": device.type}
    try:
        run = run_wrap if args.mode == "wrap" else run_compile
        result.update(run(args, device, rank, out))
    except Exception as err:
        result["error"] = f"rank {rank}: {type(err).__name__}: {err}"[:1500]
        result["traceback"] = traceback.format_exc()[-3000:]
        (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
        raise
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
