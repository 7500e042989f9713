"""Worker script: trl's SFT/DPO trainers with PALSGD on a small local Llama checkpoint and chat data.

``--case``:

* ``sft``: full fine-tune, conversational data (``messages``) through the checkpoint's chat template,
  loss on the assistant turns only (``assistant_only_loss``);
* ``lora``: the same with ``peft_config=LoraConfig(...)``: only the adapter trains and syncs; checkpoints
  (``--save-steps``) and the final ``save_model`` write the global adapter;
* ``dpo``: ``PALSGDDPOTrainer`` on conversational preference pairs, LoRA;
* ``lora_zero2``: ``lora`` under DeepSpeed ZeRO-2 (``deepspeed=recipes/deepspeed/zero2.json``) with
  ``palsgd_shard_size=2``: launched on 4 processes, 2 PALSGD workers of 2 ZeRO ranks each, every rank
  owning (and syncing) its partition of the adapter's fp32 master weights.

``--resume-from`` restarts from a checkpoint of an earlier run. The checkpoint and data are built
(once, by local rank 0) under ``--data-dir``. Writes rank{R}.json into --out: final weights' hashes,
the step kinds, palsgd metrics and comm bytes per step, log_history, tokens this rank trained on at each
log, and (rank 0, LoRA) whether every saved adapter reloads equal to the global model at its save.
"""

import argparse
import faulthandler
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import load_dataset
from transformers import TrainerCallback

from palsgd_hf.integrations.trl import PALSGDDPOConfig, PALSGDDPOTrainer, PALSGDSFTConfig, PALSGDSFTTrainer
from palsgd_hf.lm import build_chat_checkpoint, write_chat_jsonl, write_preference_jsonl

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "deepspeed"


def _sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _named_global(trainer) -> dict[str, torch.Tensor]:
    """The global model's trainable tensors (PALSGD's anchor), by parameter name.

    Read through ``global_weights()``, which swaps the anchor in and the local weights back out: under
    ZeRO the anchor is this rank's flat partition, and only the model's parameters carry names. Collective
    within a ZeRO replica (the swap re-gathers the weights), so every rank calls it at the same point.
    """
    with trainer.palsgd.global_weights():
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


KIND_OF = {"warmup_steps": "warmup", "gradient_steps": "gradient", "pseudo_syncs": "pseudo_sync"}


class Recorder(TrainerCallback):
    """Step kinds and palsgd metrics per step; the anchor at every save; this rank's tokens at every log."""

    def __init__(self):
        self.trainer = None
        self.kinds, self.per_step, self.tokens_at_log = [], [], {}
        self.anchors_at_save: dict[int, dict[str, torch.Tensor]] = {}
        self.local_differs_at_save: dict[int, bool] = {}
        self._last = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = dict(self.trainer.palsgd.counters)  # after a resume: the counters restored from the checkpoint

    def on_step_end(self, args, state, control, **kwargs):
        counters = dict(self.trainer.palsgd.counters)
        grew = [k for k in ("warmup_steps", "gradient_steps", "pseudo_syncs") if counters[k] != self._last.get(k, 0)]
        self.kinds.append(KIND_OF[grew[0]])
        self._last = counters
        m = self.trainer.palsgd.metrics()
        self.per_step.append({
            "step": state.global_step, "outer_syncs": m["outer_syncs"], "comm_bytes": m["comm_bytes"],
            "peer_bytes": self.trainer.palsgd.peers.stats.bytes_sent,  # across workers only (not within a replica)
        })

    def on_save(self, args, state, control, **kwargs):
        anchor = _named_global(self.trainer)
        self.anchors_at_save[state.global_step] = anchor
        local = dict(self.trainer.model.named_parameters())
        self.local_differs_at_save[state.global_step] = any(not torch.equal(local[n], a) for n, a in anchor.items())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.tokens_at_log[state.global_step] = self.trainer.local_tokens


def counting(cls):
    """The trainer class, counting the (attention-mask) tokens this rank trains on, to check trl's num_tokens."""

    class Counting(cls):
        local_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.model.training and "attention_mask" in inputs:
                self.local_tokens += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return Counting


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--case", choices=["sft", "lora", "dpo", "lora_zero2"], required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--H", type=int, default=6)
    ap.add_argument("--p", type=float, default=0.3)
    ap.add_argument("--coins", default="shared")
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume-from", default=None)
    return ap.parse_args()


def prepare_data(data_dir: Path, local_rank: int) -> None:
    if local_rank == 0 and not (data_dir / "done").exists():
        build_chat_checkpoint(data_dir / "ckpt")
        write_chat_jsonl(data_dir / "chat.jsonl", 400)
        write_preference_jsonl(data_dir / "pref.jsonl", 400)
        (data_dir / "done").write_text("ok")


def main() -> None:
    args = parse()
    faulthandler.dump_traceback_later(200, exit=False)  # a hang shows every thread's stack before the test's timeout
    out, data_dir = Path(args.out), Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(data_dir, int(os.environ.get("LOCAL_RANK", 0)))
    common = dict(
        output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="constant", logging_steps=4, report_to="none", seed=0, use_cpu=True, bf16=False,
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        palsgd_sync_interval=args.H, palsgd_pseudo_sync_prob=args.p, palsgd_mixing_rate=15.0,
        palsgd_warmup_steps=2, palsgd_coins=args.coins, palsgd_comm_timeout_seconds=90,
    )
    if args.case == "lora_zero2":
        # Under DeepSpeed the Trainer steps the engine inside backward; ZeRO-2 shards the adapter's optimizer
        # state and gradients over the 2 ranks of each worker (the HF Trainer fills the config's "auto" values).
        common.update(deepspeed=str(RECIPES / "zero2.json"), palsgd_shard_size=2)
    lora = None
    if args.case in ("lora", "dpo", "lora_zero2"):
        from peft import LoraConfig  # optional extra, imported by the cases that need it

        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    if args.case == "dpo":
        config = PALSGDDPOConfig(**common, max_length=64, beta=0.1)
        cls, data = PALSGDDPOTrainer, "pref.jsonl"
    else:
        config = PALSGDSFTConfig(**common, max_length=64, assistant_only_loss=True)
        cls, data = PALSGDSFTTrainer, "chat.jsonl"
    # Only once the arguments exist (they set up the process group): the data directory is ready on every rank.
    dist.barrier()
    train = load_dataset("json", data_files=str(data_dir / data), split="train")
    recorder = Recorder()
    trainer = counting(cls)(model=str(data_dir / "ckpt"), args=config, train_dataset=train, peft_config=lora,
                            callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=args.resume_from)
    rank = config.process_index
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    result = {
        "rank": rank, "kinds": recorder.kinds, "metrics": trainer.palsgd.metrics(), "per_step": recorder.per_step,
        "log_history": trainer.state.log_history, "tokens_at_log": recorder.tokens_at_log,
        "final_sha": _sha(trainer.model.parameters()), "trainable_sha": _sha(trainable),
        "trainable_numel": sum(p.numel() for p in trainable),
        "total_numel": sum(p.numel() for p in trainer.model.parameters()),
        "anchor_numel": sum(a.numel() for a in trainer.palsgd._anchor.tensors),
        "local_differs_at_save": recorder.local_differs_at_save,
        "replica": trainer.palsgd.replica_index,
    }
    if trainer.is_deepspeed_enabled:
        zero = trainer.model_wrapped.optimizer
        # Trainable numel of each ZeRO parameter group (before DeepSpeed's padding), and this rank's partitions.
        result["zero_group_numel"] = [sum(p.numel() for p in group) for group in zero.bit16_groups]
        result["zero_world"] = dist.get_world_size(zero.dp_process_group)
        result["owned_numel"] = [t.numel() for g in trainer.palsgd.adapter.owned_groups() for t in g.tensors]
    if lora is not None:
        final_dir = Path(args.run_dir) / "final"
        trainer.save_model(str(final_dir))
        recorder.anchors_at_save[-1] = _named_global(trainer)
        if rank == 0:
            result["reloads_equal"] = check_reloads(data_dir / "ckpt", Path(args.run_dir), recorder.anchors_at_save)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def check_reloads(base_dir: Path, run_dir: Path, anchors: dict[int, dict[str, torch.Tensor]]) -> dict[str, bool]:
    """Each saved adapter, loaded with PeftModel.from_pretrained on the base, equals the anchor at its save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    verdicts = {}
    for step, anchor in anchors.items():
        where = run_dir / ("final" if step == -1 else f"checkpoint-{step}")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), where)
        loaded = dict(model.named_parameters())
        verdicts[str(step)] = all(torch.equal(loaded[name], tensor) for name, tensor in anchor.items())
    return verdicts


if __name__ == "__main__":
    main()
