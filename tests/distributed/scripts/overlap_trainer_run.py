"""Worker script: tests/distributed/scripts/trainer_run.py with an overlapped and/or bf16 outer sync.

trainer_run.py is a real 2-process PALSGDTrainer run (tiny GPT-Neo, Shakespeare, DDP on gloo) with
checkpoints, a simulated crash and resume. This wrapper takes two more flags, ``--overlap`` and
``--comm-dtype``, and runs trainer_run.py unchanged with ``palsgd_overlap_steps`` and
``palsgd_comm_dtype`` set, so that a Trainer checkpoint taken in the middle of a wait can be
resumed. All other flags and the output format are trainer_run.py's.
"""

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trainer_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--overlap", type=int, default=0)
    ap.add_argument("--comm-dtype", default="fp32")
    ours, rest = ap.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    # trainer_run builds its arguments through the module-level name: add our two fields to them.
    trainer_run.PALSGDTrainingArguments = functools.partial(
        trainer_run.PALSGDTrainingArguments, palsgd_overlap_steps=ours.overlap, palsgd_comm_dtype=ours.comm_dtype
    )
    trainer_run.main()


if __name__ == "__main__":
    main()
