"""Worker script: DeepSpeed set-ups PALSGD must refuse with a clear error before any step runs.

Each case builds a real engine (2 processes, gloo) and records the exception type and message
that ``palsgd_hf.adapters.deepspeed`` raises for it; rank{R}.json maps case -> [type, message].
"""

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from palsgd_hf import PALSGDConfig
from palsgd_hf.adapters.deepspeed import attach, initialize


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def ds_config(**zero):
    return {
        "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2, **zero}, "steps_per_print": 1_000_000,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = PALSGDConfig(sync_interval=4, warmup_steps=1, shard_size=1)
    results = {}

    def case(name, fn):
        try:
            fn()
            results[name] = [None, "no error"]
        except Exception as exc:  # noqa: BLE001 - the test checks type and message
            results[name] = [type(exc).__name__, str(exc)]
        dist.barrier()

    def stage0():
        model, opt = model_and_optimizer()
        initialize(model=model, optimizer=opt, config=cfg, ds_config={**ds_config(), "zero_optimization": {"stage": 0}})

    def offload():
        model, opt = model_and_optimizer()
        conf = ds_config(offload_optimizer={"device": "cpu"})
        conf["zero_force_ds_cpu_optimizer"] = False  # keep torch AdamW (DeepSpeed's CPU Adam compiles ~35 s)
        initialize(model=model, optimizer=opt, config=cfg, ds_config=conf)

    def zero_over_world():
        # ZeRO built without the PALSGD mpu shards over both ranks; with shard_size=1 that is wrong.
        model, opt = model_and_optimizer()
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config())
        attach(engine, cfg)

    def not_divisible():
        model, opt = model_and_optimizer()
        initialize(model=model, optimizer=opt, config=PALSGDConfig(shard_size=4), ds_config=ds_config())

    def batch_size():
        model, opt = model_and_optimizer()
        initialize(model=model, optimizer=opt, config=cfg, ds_config={**ds_config(), "train_batch_size": 6})

    # zero_over_world first: an engine built with an mpu leaves it in DeepSpeed's globals (groups.mpu),
    # where later engines without one would pick it up.
    for name, fn in [("zero_over_world", zero_over_world), ("stage0", stage0), ("offload", offload),
                     ("not_divisible", not_divisible), ("batch_size", batch_size)]:
        case(name, fn)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
