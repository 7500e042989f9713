"""A prepared GPU check of PALSGD's CUDA paths, in one call: one table, one JSON file.

    python scripts/gpu_check.py --out results.json                 # a GPU box (one call, < 10 min)
    python scripts/gpu_check.py --device cpu --quick --budget-seconds 150   # CI: skips what needs CUDA

Each check (see CHECKS and docs/gpu.md) runs in a child process of its own
(scripts/gpu_check_cases.py) with its own timeout, killed with its whole process group when the
time is up, so one crash or hang reports FAIL and the next check still runs. The whole script
stops starting checks when --budget-seconds would be exceeded; a check not started for lack of
time is FAIL ("not run"), never silently dropped. Checks that need CUDA are SKIP without a GPU,
each saying so. Exit status: 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = HERE / "gpu_check_cases.py"


@dataclass(frozen=True)
class Check:
    name: str
    proves: str
    needs_cuda: bool
    timeout_s: float  # on a GPU; CPU runs use cpu_timeout_s
    cpu_timeout_s: float = 120.0


# Order = priority: when the budget runs short, the last ones are the ones not run.
CHECKS = (
    Check("bf16_trainer", "PALSGDTrainer, bf16, p>0, several syncs; anchor fp32 beside the weights", False, 120, 90),
    Check("anchor_pinned_cpu", "anchor_device='cpu': anchor in pinned host memory, same sync counts", True, 120),
    Check("overlap", "overlap_steps=2: x_launch and the anchor on the weights' device", False, 120, 90),
    Check("two_process", "2 ranks (gloo+CUDA on one GPU, NCCL on >=2): one global model, collective devices",
          False, 150, 120),
    Check("overhead", "PALSGD's own cost per step vs a plain step (GPT-Neo-125M shape on GPU)", False, 150, 180),
    Check("torch_compile", "torch_compile=True through PALSGDTrainer, one process (inductor on GPU)", False, 240, 120),
    Check("torch_compile_ddp", "torch_compile=True on 2 ranks: DDP recognized, no gradient all-reduce when local",
          False, 200, 120),
    Check("deepspeed_zero2", "DeepSpeed ZeRO-2 bf16 + palsgd_shard_size=1 on CUDA, one process", True, 150),
)
BY_NAME = {c.name: c for c in CHECKS}


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # no torch at all: every check will fail anyway, and say why
        return False


def run_check(check: Check, device: str, quick: bool, timeout: float, workdir: Path) -> dict:
    """Run one check in a child process group; a crash, hang or missing result is a FAIL."""
    result_file = workdir / f"{check.name}.json"
    cmd = [sys.executable, str(CASES), check.name, "--result", str(result_file), "--device", device,
           "--timeout", str(max(10.0, timeout - 15))]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    log = workdir / f"{check.name}.log"
    start = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the child then ends the torchrun sessions it started; then its whole group.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace")[-3000:]
    if rc is None:
        return {"status": "FAIL", "figure": f"timed out after {timeout:.0f} s (hang?)", "seconds": seconds,
                "log_tail": tail}
    if not result_file.exists():
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        return {"status": "FAIL", "figure": f"crashed (rc={rc}): {last[:300]}", "seconds": seconds, "log_tail": tail}
    result = json.loads(result_file.read_text())
    result["seconds"] = seconds
    if result["status"] == "FAIL":
        result["log_tail"] = tail
    return result


def cross_check(results: dict[str, dict]) -> None:
    """anchor_pinned_cpu must take exactly bf16_trainer's steps: same seed, same coins, same counts."""
    a, b = results.get("bf16_trainer"), results.get("anchor_pinned_cpu")
    if not a or not b or a["status"] != "PASS" or b["status"] != "PASS":
        return
    keys = ("outer_syncs", "pseudo_syncs", "gradient_steps")
    ca, cb = ({k: r["details"][k] for k in keys} for r in (a, b))
    la, lb = a["details"]["loss_last"], b["details"]["loss_last"]
    b["details"]["vs_bf16_trainer"] = {"counts_equal": ca == cb, "loss_last_diff": lb - la}
    if ca != cb:
        b["status"] = "FAIL"
        b["figure"] = f"step counts {cb} differ from bf16_trainer's {ca} (same seed: they must be equal)"
    else:
        b["figure"] += f"; counts = bf16_trainer's, last loss {lb - la:+.4f} vs it"


def table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("check", "status", "seconds", "figure")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head[:3], widths)) + "  " + head[3]]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines)


def environment(device: str) -> dict:
    info = {"python": sys.version.split()[0], "device": device}
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda":
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        import transformers

        info["transformers"] = transformers.__version__
    except Exception as err:
        info["import_error"] = repr(err)
    return info


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    ap.add_argument("--out", type=Path, default=default_out, help="JSON results (default $OUT/gpu_check.json)")
    ap.add_argument("--budget-seconds", type=float, default=480.0, help="hard wall limit of the whole script")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when a GPU is visible; cpu skips the checks that need CUDA")
    ap.add_argument("--quick", action="store_true", help="small step counts (CI)")
    ap.add_argument("--only", nargs="+", choices=sorted(BY_NAME), help="run these checks only")
    ap.add_argument("--skip", nargs="+", choices=sorted(BY_NAME), default=[], help="do not run these checks")
    return ap.parse_args()


def main() -> int:
    args = parse()
    begin = time.perf_counter()
    deadline = begin + args.budget_seconds
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    elif device == "cuda" and not cuda_available():
        print("--device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    chosen = [c for c in CHECKS if (not args.only or c.name in args.only)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for check in chosen:
            if check.name in args.skip:
                results[check.name] = {"status": "SKIP", "figure": "--skip", "seconds": 0.0}
            elif check.needs_cuda and device != "cuda":
                results[check.name] = {"status": "SKIP", "figure": "needs CUDA (no GPU)", "seconds": 0.0}
            else:
                own = check.timeout_s if device == "cuda" else check.cpu_timeout_s
                left = deadline - time.perf_counter() - 5
                if left < min(own, 30):
                    results[check.name] = {"status": "FAIL", "seconds": 0.0,
                                           "figure": f"not run: {left:.0f} s of --budget-seconds left"}
                else:
                    results[check.name] = run_check(check, device, args.quick, min(own, left), Path(tmp))
            r = results[check.name]
            print(f"[gpu_check] {check.name}: {r['status']} ({r['seconds']:.1f} s) {r['figure']}", flush=True)
    cross_check(results)
    rows = [(n, r["status"], f"{r['seconds']:.1f}", r["figure"]) for n, r in results.items()]
    print(table(rows))
    report = {
        "environment": environment(device), "quick": args.quick, "budget_seconds": args.budget_seconds,
        "wall_seconds": time.perf_counter() - begin,
        "checks": {n: {"proves": BY_NAME[n].proves, "needs_cuda": BY_NAME[n].needs_cuda, **r}
                   for n, r in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
