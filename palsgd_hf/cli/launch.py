"""Starting the processes of a recipe: the torchrun / ``accelerate launch`` command line, and its traps.

``palsgd-hf train`` validates a recipe, then re-runs the per-process entry
(``python -m palsgd_hf.cli.run RECIPE [--key value ...]``) under the recipe's launcher:

* ``torchrun --standalone --nproc_per_node N`` (a free port, one node), or
* ``accelerate launch [--config_file C] --multi_gpu --num_processes N --main_process_port 0``.

The CPU trap this module exists for: ``accelerate launch --cpu --num_processes 2``, and a config
with ``distributed_type: MULTI_CPU`` (or ``use_cpu: true``), start ONE process (accelerate goes
multi-process on CPU only through ``mpirun``), and the run trains alone without a word. The
launch built here always uses ``--multi_gpu`` for N > 1, which starts N processes and falls back
to gloo on a machine without GPUs. Inside the job, :func:`check_world` refuses a run whose world
has one process while the recipe asked for more (e.g. the user typed the trap command themselves).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Optional, Sequence

import yaml

from ..devices import cpu_only

logger = logging.getLogger(__name__)

ENTRY_MODULE = "palsgd_hf.cli.run"
# accelerate distributed types we can launch: DDP on GPUs or CPUs, and DeepSpeed ZeRO.
_DDP_TYPES = {"NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"}
_SINGLE_PROCESS_ON_CPU = {"NO", "MULTI_CPU"}
TRAP = (
    "`accelerate launch --cpu --num_processes N` and configs with distributed_type MULTI_CPU or use_cpu: true "
    "start ONE process (accelerate needs mpirun for several CPU processes)"
)


class LaunchError(ValueError):
    """A launch that would not run the processes the recipe asks for."""


def check_accelerate_config(path: str, num_processes: int) -> dict:
    """Read an ``accelerate config`` YAML; refuse what cannot run, note what the launch will fix."""
    try:
        config = yaml.safe_load(open(path)) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LaunchError(f"accelerate config {path}: cannot read it as YAML: {err}") from None
    if not isinstance(config, dict):
        raise LaunchError(f"accelerate config {path}: expected a mapping, got {type(config).__name__}.")
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind not in _DDP_TYPES and kind != "DEEPSPEED":
        raise LaunchError(
            f"accelerate config {path}: distributed_type {kind} is not supported with PALSGD; use MULTI_GPU "
            "(plain DDP, also on CPU) or DEEPSPEED (ZeRO inside each worker)."
        )
    if num_processes > 1 and (kind in _SINGLE_PROCESS_ON_CPU or config.get("use_cpu")):
        logger.warning(
            "accelerate config %s says distributed_type=%s%s: %s. palsgd-hf launches it with --multi_gpu instead, "
            "which starts %d processes (gloo on CPU).", path, kind, ", use_cpu: true" if config.get("use_cpu") else "",
            TRAP, num_processes,
        )
    configured = config.get("num_processes")
    if isinstance(configured, int) and configured not in (num_processes, -1):
        logger.warning(
            "accelerate config %s says num_processes=%d; the recipe's launch.num_processes=%d wins.",
            path, configured, num_processes,
        )
    return config


def check_hardware(recipe) -> None:
    """Refuse, before launching, a recipe that needs a GPU on a machine without one."""
    wants = [k for k in ("bf16", "fp16") if recipe.training.get(k)]
    if wants and cpu_only() and not recipe.training.get("use_cpu"):
        raise LaunchError(
            f"recipe {recipe.source} sets {wants[0]}: true, which the Trainer allows only on a GPU, and this machine "
            f"has none; pass --{wants[0]} false to run it on CPU."
        )


def build_command(recipe, entry_args: Sequence[str]) -> list[str]:
    """The command that runs ``python -m palsgd_hf.cli.run *entry_args`` on the recipe's processes."""
    launch = recipe.launch
    n = launch.num_processes
    entry = ["-m", ENTRY_MODULE, *entry_args]
    if launch.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *entry]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    kind = "NO"
    if launch.accelerate_config is not None:
        config = check_accelerate_config(launch.accelerate_config, n)
        kind = str(config.get("distributed_type", "NO")).upper()
        cmd += ["--config_file", launch.accelerate_config]
    if kind == "DEEPSPEED":
        cmd += ["--use_deepspeed"]
    elif n > 1:
        cmd += ["--multi_gpu"]  # never --cpu: see the module docstring
    cmd += ["--num_processes", str(n), "--num_machines", "1", "--main_process_port", "0"]
    cmd += ["--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS", "1")]
    return [*cmd, *entry]


def launch_env() -> dict[str, str]:
    """The children's environment: one BLAS thread per process unless the user chose otherwise."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cpu_only():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by transformers) would warn per process
    return env


def in_launched_process() -> bool:
    """True inside a torchrun / accelerate-launched process (LOCAL_RANK is set by both)."""
    return "LOCAL_RANK" in os.environ


def check_world(expected_per_node: int, world_size: Optional[int] = None) -> int:
    """Refuse a job of one process when the recipe asked for several: the silent single-process trap."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world == 1 and expected_per_node > 1:
        via_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_USE_CPU" in os.environ
        how = "it was started by accelerate's single-process launcher" if via_accelerate else "it was not launched"
        raise LaunchError(
            f"this job has 1 process but the recipe asks for launch.num_processes={expected_per_node}: {how}. "
            f"Note: {TRAP}. Run `palsgd-hf train RECIPE`, or torchrun --nproc_per_node {expected_per_node} -m "
            f"{ENTRY_MODULE} RECIPE, or accelerate launch --multi_gpu --num_processes {expected_per_node} -m "
            f"{ENTRY_MODULE} RECIPE; to train on one process on purpose, pass --launch.num_processes 1."
        )
    if world % expected_per_node != 0 and world != 1:
        logger.warning(
            "the job has %d processes, not a multiple of the recipe's launch.num_processes=%d per node.",
            world, expected_per_node,
        )
    return world


def format_command(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)
