"""Runs examples/accelerate_loop.py unchanged and records what its evaluate() evaluated.

Launched in place of the example (same arguments, same launcher). The example's ``evaluate`` is
wrapped: a forward pre-hook on the model fingerprints the weights every forward pass of the
evaluation sees, next to the fingerprints of the weights just before and just after it. Writes
``probe_rank<R>.json`` (one row per evaluation, in order) into the example's --output_dir.
"""

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "accelerate_loop.py"


def fingerprint(module: torch.nn.Module) -> str:
    params = torch.cat([p.detach().flatten().double() for p in module.parameters()])
    return hashlib.sha256(params.numpy().tobytes()).hexdigest()


def main() -> None:
    spec = importlib.util.spec_from_file_location("accelerate_loop", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    original, rows = example.evaluate, []

    def evaluate(model, eval_loader, accelerator, palsgd):
        module = accelerator.unwrap_model(model)
        seen: list[str] = []
        handle = module.register_forward_pre_hook(lambda m, _args: seen.append(fingerprint(m)))
        before = fingerprint(module)
        try:
            loss = original(model, eval_loader, accelerator, palsgd)
        finally:
            handle.remove()
        rows.append({"before": before, "evaluated": sorted(set(seen)), "forwards": len(seen),
                     "after": fingerprint(module), "eval_loss": loss})
        return loss

    example.evaluate = evaluate  # main() looks it up as a module global
    example.main()
    args = example.parse_args(sys.argv[1:])
    out = Path(args.output_dir) / f"probe_rank{os.environ['RANK']}.json"
    out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
