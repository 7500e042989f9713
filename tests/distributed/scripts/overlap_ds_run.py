"""Worker script: tests/distributed/scripts/ds_run.py with an overlapped and/or bf16 outer sync.

ds_run.py runs PALSGD on DeepSpeed ZeRO partitions (``--mode ds``) or on the unsharded DDP path
(``--mode ref``) with the same data, init and schedule. This wrapper takes two more flags,
``--overlap``, ``--comm-dtype`` (and ``--fragments``), and runs ds_run.py unchanged with those two PALSGDConfig fields
set, so that the ZeRO and unsharded paths can be compared with both features on (and ZeRO resume
in the middle of a wait). All other flags and the output format are ds_run.py's.
"""

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--overlap", type=int, default=0)
    ap.add_argument("--comm-dtype", default="fp32")
    ap.add_argument("--fragments", type=int, default=1)
    ours, rest = ap.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    # ds_run builds its config through the module-level name: give it ours on top of its own fields.
    ds_run.PALSGDConfig = functools.partial(
        ds_run.PALSGDConfig, overlap_steps=ours.overlap, comm_dtype=ours.comm_dtype, fragments=ours.fragments
    )
    ds_run.main()


if __name__ == "__main__":
    main()
