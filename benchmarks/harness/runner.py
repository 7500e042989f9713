"""Run the benchmark: every method on every link, same model, data, seed and budget.

For each link (e.g. unshaped, then 100 Mbit/s) the runner brings up one namespace per worker
(:mod:`.netns`), measures the link (:mod:`.probe`), runs DDP first (its final eval loss becomes
the target), then the local methods with that target, each rank of each run inside its own
namespace (:mod:`.launch`, :mod:`.worker`). The namespaces are torn down after the link's runs,
also when a run fails or the benchmark is interrupted. Then PALSGD's own overhead is measured in
this process (:mod:`.overhead`). The result is the dict :mod:`.report` writes.

``netns``: ``"on"`` requires namespaces (refuses with the reason when it lacks the rights),
``"off"`` runs every job on loopback (only an unshaped link is possible), ``"auto"`` uses them
when it can and otherwise runs unshaped on loopback and says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

from .launch import launch
from .netns import LinkSpec, NetnsCluster, NetnsUnavailable, check_rights, cleanup_stale
from .settings import BenchSettings

logger = logging.getLogger(__name__)

NETNS_MODES = ("auto", "on", "off")


def resolve_netns(mode: str, links: list[LinkSpec]) -> tuple[bool, list[LinkSpec], Optional[str]]:
    """(use namespaces?, the links that can run, a note when something was dropped). Refuses early."""
    if mode not in NETNS_MODES:
        raise ValueError(f"netns={mode!r} is not one of {NETNS_MODES}.")
    shaped = any(link.rate_mbit is not None for link in links)
    if mode == "off":
        if shaped:
            raise NetnsUnavailable(
                "a shaped link (--rate-mbit) needs network namespaces, but --netns off was given; drop --netns off "
                "(run as root) or benchmark only the unshaped link."
            )
        return False, links, None
    try:
        check_rights(shape=shaped)
    except NetnsUnavailable as err:
        if mode == "on":
            raise
        kept = [link for link in links if link.rate_mbit is None] or [LinkSpec()]
        note = f"network namespaces unavailable ({err}); ran unshaped on loopback only"
        logger.warning("%s", note)
        return False, kept, note
    return True, links, None


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _load() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_method(settings: BenchSettings, method: str, run_dir: Path, cluster: Optional[NetnsCluster],
               target_loss: Optional[float], timeout: float) -> dict[str, Any]:
    """One training run; returns the callback's record plus ``method`` and the launch wall time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path = run_dir / "record.json"
    spec = {**settings.to_dict(), "method": method, "target_loss": target_loss,
            "min_steps": settings.steps if target_loss is not None else 0, "out": str(record_path)}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    logger.info("Run %s (%s): up to %d steps, target %s", method, run_dir.parent.name, settings.max_steps(method),
                "none" if target_loss is None else f"{target_loss:.4f}")
    load_before = _load()
    wall = launch(["-m", "benchmarks.harness.worker", "--spec", str(run_dir / "spec.json")], settings.workers,
                  run_dir, cluster=cluster, timeout=timeout)
    record = json.loads(record_path.read_text())
    # The machine's 1-minute load average around the run: wall times are only comparable at similar load.
    record.update(method=method, launch_seconds=wall, load_average=[load_before, _load()])
    logger.info("  %s: %d steps, %.1f s training, final eval loss %.4f, %.1f MB sent", method, record["steps"],
                record["train_seconds"], record["history"][-1]["eval_loss"], record["comm_bytes"] / 1e6)
    return record


def run_probe(settings: BenchSettings, link_dir: Path, cluster: Optional[NetnsCluster], sizes_kib: list[int]):
    try:
        launch(["-m", "benchmarks.harness.probe", "--out", str(link_dir), "--reps", "3",
                "--sizes-kib", *map(str, sizes_kib)], settings.workers, link_dir / "probe", cluster=cluster,
               timeout=180)
        return json.loads((link_dir / "probe.json").read_text())
    except Exception as err:  # a failed probe must not cost the runs; the table then says "not measured"
        logger.warning("Link probe failed: %s", err)
        return None


def _save_partial(bench: dict[str, Any], out_dir: Path) -> None:
    """Every finished run is kept in ``partial.json``: a failure later on does not lose it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "partial.json.tmp"
    tmp.write_text(json.dumps(bench, indent=1, default=str))
    os.replace(tmp, out_dir / "partial.json")


def run_benchmark(
    settings: BenchSettings,
    links: list[LinkSpec],
    out_dir: Path,
    *,
    netns: str = "auto",
    run_timeout: float = 1800.0,
    overhead_steps: int = 0,
    probe_sizes_kib: tuple[int, ...] = (64, 1024, 4096),
    command: str = "",
) -> dict[str, Any]:
    """Everything, in order; returns the benchmark dict (see :mod:`.report`)."""
    use_netns, links, note = resolve_netns(netns, links)
    labels = [link.label for link in links]
    if len(set(labels)) != len(labels):
        raise ValueError(f"links {labels} repeat a label; give each link once.")
    if use_netns:
        cleanup_stale()
    # Tokenize once here, so that the ranks of every run read the datasets cache instead.
    from .worker import prepare_data

    prepare_data(settings)
    bench: dict[str, Any] = {"settings": settings.to_dict(), "machine": machine_info(), "command": command,
                             "netns": use_netns, "note": note, "links": {}, "overhead": None}
    started = time.perf_counter()
    for link in links:
        link_dir = out_dir / link.label
        cluster = NetnsCluster(settings.workers, link) if use_netns else None
        try:
            if cluster is not None:
                cluster.up()
            entry: dict[str, Any] = {"link": dataclasses.asdict(link), "probe": None, "runs": {}}
            bench["links"][link.label] = entry
            if settings.workers > 1:
                entry["probe"] = run_probe(settings, link_dir, cluster, list(probe_sizes_kib))
            ddp = run_method(settings, "ddp", link_dir / "ddp", cluster, None, run_timeout)
            entry["runs"]["ddp"] = ddp
            _save_partial(bench, out_dir)
            target = ddp["history"][-1]["eval_loss"]
            for method in (m for m in settings.methods if m != "ddp"):
                entry["runs"][method] = run_method(settings, method, link_dir / method, cluster, target, run_timeout)
                _save_partial(bench, out_dir)
        finally:
            if cluster is not None:
                cluster.down()
    bench["benchmark_seconds"] = time.perf_counter() - started
    if overhead_steps:
        from .overhead import measure_overhead

        bench["overhead"] = measure_overhead(settings, steps=overhead_steps)
    return bench
