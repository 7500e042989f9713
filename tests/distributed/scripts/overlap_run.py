"""Worker script: overlapped / bf16 outer syncs on real gloo process groups, one rank per process.

``--task reference`` trains the float64 linear-regression problem of tests/unit/test_reference.py
through ``wrap_optimizer`` (real peer/replica groups, real asynchronous collectives), optionally
saving and restoring every object in the middle of a wait (``--resume-at``), and writes the step
kinds, the weights before and after finalize() and the metrics.

``--task timing`` runs a wide model whose steps do real compute, once blocking and once with
``--overlap`` steps of overlap, and writes the seconds blocked in, and hidden behind, the syncs.

Writes rank{R}.json into --out.
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository, for tests.unit.*

from palsgd_hf import PALSGDConfig, StepKind, wrap_optimizer  # noqa: E402
from tests.unit.test_overlap import make_inner, train  # noqa: E402
from tests.unit.test_reference import Linear  # noqa: E402


def reference_task(args, cfg: PALSGDConfig) -> dict:
    def build():
        model = Linear()
        inner, sched = make_inner(model)
        return model, inner, sched, wrap_optimizer(model, inner, cfg)

    model, inner, sched, opt = build()
    data = opt.algorithm.replica_index  # the ranks of one replica hold one model copy: same data
    stop = args.resume_at if args.resume_at is not None else args.steps
    kinds = train(model, opt, sched, data, 0, stop)
    in_flight = None
    if args.resume_at is not None:
        in_flight = opt.algorithm._pending is not None
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "inner": inner.state_dict(), "sched": sched.state_dict(),
                    "palsgd": opt.algorithm.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=False)
        model, inner, sched, opt = build()  # fresh objects and process groups, as after a restart
        model.load_state_dict(saved["model"])
        inner.load_state_dict(saved["inner"])
        sched.load_state_dict(saved["sched"])
        opt.algorithm.load_state_dict(saved["palsgd"])
        kinds += train(model, opt, sched, data, stop, args.steps)
    before, metrics = [model.w.tolist(), model.b.tolist()], opt.algorithm.metrics()
    opt.algorithm.finalize()
    return {"replica": data, "kinds": kinds, "before": before, "final": [model.w.tolist(), model.b.tolist()], "metrics": metrics,
            "in_flight_at_save": in_flight}


def timing_task(args, rank: int) -> dict:
    out = {}
    for overlap in (0, args.overlap):
        torch.manual_seed(0)
        model = torch.nn.Linear(args.width, args.width, bias=False)
        inner = torch.optim.SGD(model.parameters(), lr=1e-4)
        cfg = PALSGDConfig(method="diloco", sync_interval=args.H, warmup_steps=0, overlap_steps=overlap,
                           comm_dtype=args.comm_dtype)
        opt = wrap_optimizer(model, inner, cfg)
        x = torch.randn(args.batch, args.width)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            if opt.algorithm.step_kind() is not StepKind.PSEUDO_SYNC:
                model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        m = opt.algorithm.metrics()
        opt.algorithm.finalize()
        out[f"overlap{overlap}"] = {**m, "train_seconds": time.perf_counter() - start}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", choices=["reference", "timing"], default="reference")
    ap.add_argument("--method", default="palsgd")
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--p", type=float, default=None)
    ap.add_argument("--eta", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--comm-dtype", default="fp32")
    ap.add_argument("--shard-size", type=int, default=1)
    ap.add_argument("--fragments", type=int, default=1)
    ap.add_argument("--resume-at", type=int, default=None)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.task == "timing":
        result = timing_task(args, rank)
    else:
        cfg = PALSGDConfig(
            method=args.method, sync_interval=args.H, pseudo_sync_prob=args.p, mixing_rate=args.eta,
            warmup_steps=args.warmup, overlap_steps=args.overlap, comm_dtype=args.comm_dtype, shard_size=args.shard_size,
            fragments=args.fragments,
        )
        result = reference_task(args, cfg)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, **result}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
