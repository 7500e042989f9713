"""Benchmark arithmetic and output on synthetic runs: time to target, equal-token loss, bytes, report files.

The runs here are hand-made dicts in the shape the time-to-quality callback writes, with numbers
chosen so that every expected value can be worked out by hand in the comments.
"""

from __future__ import annotations

import json

import pytest

from palsgd_hf.config import PALSGDConfig
from benchmarks.harness.report import markdown_table, run_label, write_report
from benchmarks.harness.settings import BenchSettings, split_run, tiny_settings
from benchmarks.harness.summary import check_targets, first_reach, loss_at_step, summarize_link


def run(steps, seconds_per_step, losses, comm_bytes, eval_every=10, local_start=None):
    history = [
        {"step": (i + 1) * eval_every, "train_seconds": (i + 1) * eval_every * seconds_per_step,
         "eval_loss": loss, "comm_bytes": 0.0, "comm_seconds": 0.0}
        for i, loss in enumerate(losses)
    ]
    return {"steps": steps, "train_seconds": steps * seconds_per_step, "history": history,
            "comm_bytes": comm_bytes, "comm_seconds": 1.0, "comm_at_local_start": local_start}


@pytest.fixture
def runs():
    # DDP: 40 steps at 1 s/step, final loss 3.0 (the target), 4 MB per step.
    # PALSGD: 0.25 s/step, reaches 2.95 <= 3.0 at step 50 (12.5 s); at DDP's 40 steps: 3.03 (+1%).
    # DiLoCo: 0.3 s/step, reaches the target at step 60 (18 s). Local SGD never does.
    return {
        "ddp": run(40, 1.0, [4.0, 3.5, 3.2, 3.0], 40 * 4e6),
        "palsgd": run(60, 0.25, [4.2, 3.6, 3.3, 3.03, 2.95, 2.9], 10 * 4e6 + 3 * 4e6,
                      local_start={"step": 10, "comm_bytes": 10 * 4e6}),
        "diloco": run(60, 0.3, [4.2, 3.7, 3.4, 3.1, 3.05, 2.99], 13 * 4e6, local_start={"step": 10, "comm_bytes": 4e7}),
        "localsgd": run(60, 0.3, [4.3, 3.8, 3.5, 3.3, 3.2, 3.1], 13 * 4e6),
    }


def test_first_reach_and_loss_at_step(runs):
    h = runs["palsgd"]["history"]
    assert first_reach(h, 3.0) == pytest.approx(12.5)
    assert first_reach(h, 3.0, key="step") == 50
    assert first_reach(h, 1.0) is None
    assert loss_at_step(h, 40) == 3.03 and loss_at_step(h, 45) is None


def test_summary_against_hand_computed_values(runs):
    s = summarize_link(runs)
    assert s["ddp"]["target_loss"] == 3.0 and s["ddp"]["time_to_target"] == 40.0
    p = s["palsgd"]
    assert p["time_to_target"] == pytest.approx(12.5)
    assert p["time_to_target_vs_ddp"] == pytest.approx(12.5 / 40)
    assert p["time_to_target_vs_diloco"] == pytest.approx(12.5 / 18)
    assert p["loss_gap_vs_ddp"] == pytest.approx(0.01)
    # 13 model-sized messages over 60 steps vs 1 per step; the local phase alone: 3 over 50 steps.
    assert p["bytes_per_step_vs_ddp"] == pytest.approx(13 / 60)
    assert p["local_bytes_per_step_vs_ddp"] == pytest.approx(3 / 50)
    assert s["localsgd"]["time_to_target"] is None and s["localsgd"]["time_to_target_vs_ddp"] is None
    assert s["localsgd"]["local_bytes_per_step_vs_ddp"] is None  # no warm-up boundary recorded
    targets = check_targets(s, sync_interval=16, rate_mbit=100)
    assert targets == {
        "time_to_target_le_0.45x_ddp": True,  # 12.5 / 40 = 0.31
        "ahead_of_localsgd_at_its_best_H": True,  # Local SGD never reaches the target
        "ahead_of_diloco": True,  # 12.5 s < 18 s
        "equal_token_loss_within_2pct_of_ddp": True,
        "local_bytes_per_step_le_1/H (H=16)": True,  # 0.06 <= 0.0625
    }
    assert check_targets(s, sync_interval=32)["local_bytes_per_step_le_1/H (H=32)"] is False
    assert check_targets(s, sync_interval=16)["time_to_target_le_1x_ddp"] is True  # unshaped / fast: <= DDP's


def test_targets_compare_with_local_sgd_at_its_best_interval(runs):
    # A second Local SGD run (H 8) reaches the target at step 50 in 10 s: before PALSGD's 12.5 s.
    runs["localsgd@8"] = run(60, 0.2, [4.2, 3.6, 3.3, 3.1, 2.99, 2.9], 13 * 4e6)
    targets = check_targets(summarize_link(runs), sync_interval=16, rate_mbit=100)
    assert targets["ahead_of_localsgd_at_its_best_H"] is False and targets["ahead_of_diloco"] is True


def test_run_variants_set_their_own_interval_or_the_auto_policy():
    s = BenchSettings(methods=("ddp", "localsgd@8", "palsgd", "palsgd@auto"))
    assert split_run("localsgd@8") == ("localsgd", "8") and split_run("palsgd") == ("palsgd", None)
    assert s.palsgd_config("localsgd@8")["sync_interval"] == 8
    assert s.palsgd_config("localsgd@8")["method"] == "localsgd"
    auto = s.palsgd_config("palsgd@auto")
    assert auto["sync_policy"] == "auto" and auto["sync_interval"] == s.sync_interval
    assert {k: v for k, v in auto.items() if k != "sync_policy"} == s.palsgd_config("palsgd")
    assert s.max_steps("localsgd@8") == s.max_steps("localsgd")
    assert [run_label(r, 16) for r in ("ddp", "localsgd@8", "palsgd", "palsgd@auto")] == [
        "DDP", "Local SGD (H 8)", "PALSGD (H 16)", "PALSGD (auto)"]
    PALSGDConfig(**s.palsgd_config("palsgd@auto"))  # the library accepts every run's settings
    PALSGDConfig(**s.palsgd_config("localsgd@8"))


def test_bench_defaults_are_the_library_defaults():
    """The sitting measures PALSGD 'with its defaults': the harness must not drift from PALSGDConfig's."""
    bench, library = BenchSettings(), PALSGDConfig()
    assert bench.sync_interval == library.sync_interval
    assert bench.palsgd_warmup_steps == library.warmup_steps
    assert bench.pseudo_sync_prob == library.pseudo_sync_prob
    assert (bench.outer_lr, bench.outer_momentum) == (library.outer_lr, library.outer_momentum)
    assert bench.pull_coefficient == library.pull  # the harness's schedule peaks at its lr: c = pull there


def test_summary_needs_ddp(runs):
    del runs["ddp"]
    with pytest.raises(ValueError, match="no DDP run"):
        summarize_link(runs)


def test_write_report_files(tmp_path, runs):
    bench = {"settings": BenchSettings(sync_interval=16).to_dict(), "machine": {"cores": 2}, "command": "x",
             "links": {"100mbit": {"link": {"rate_mbit": 100}, "probe": {"fit": {"link_mbit_s": 94.0}}, "runs": runs}},
             "overhead": None}
    paths = write_report(bench, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["links"]["100mbit"]["summary"]["palsgd"]["time_to_target"] == pytest.approx(12.5)
    md = paths["markdown"].read_text()
    for label in ("DDP", "PALSGD", "DiLoCo", "Local SGD", "measured 94 Mbit/s", "loss_100mbit.png"):
        assert label in md
    png = paths["plot_100mbit"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # One row per method, in the documented order, every cell the hand-computed value of the fixture.
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown_table(saved).splitlines()
            if line.startswith("| 100mbit")]
    assert all(row[0] == "100mbit (measured 94 Mbit/s)" for row in rows)
    # method, steps, train s, s/step, time to target, xDDP, xDiLoCo, final loss, loss at DDP's 40 steps,
    # vs DDP, MB/step (total bytes / steps), xDDP bytes (local phase: bytes after warm-up / steps after it),
    # comm s blocked, s/step added by the link (no unshaped run: n/a), load average (not recorded: n/a).
    assert [row[1:] for row in rows] == [
        ["DDP", "40", "40.0", "1.000", "40.0", "1.00", "2.22", "3.0000", "3.0000", "+0.00%", "4.000",
         "1.0000 (n/a)", "in backward", "n/a", "n/a"],  # 40/18 = 2.22 x DiLoCo
        ["Local SGD (H 16)", "60", "18.0", "0.300", "n/a", "n/a", "n/a", "3.1000", "3.3000", "+10.00%", "0.867",
         "0.2167 (n/a)", "1.0", "n/a", "n/a"],  # 52 MB / 60 steps; never reaches 3.0
        ["DiLoCo (H 16)", "60", "18.0", "0.300", "18.0", "0.45", "1.00", "2.9900", "3.1000", "+3.33%", "0.867",
         "0.2167 (0.0600)", "1.0", "n/a", "n/a"],  # (52 - 40) MB / 50 steps = 0.06 x 4 MB
        ["PALSGD (H 16)", "60", "15.0", "0.250", "12.5", "0.31", "0.69", "2.9000", "3.0300", "+1.00%", "0.867",
         "0.2167 (0.0600)", "1.0", "n/a", "n/a"],  # 12.5/40, 12.5/18
    ]


@pytest.mark.parametrize("overrides, message", [
    ({"methods": ("palsgd",)}, "must include 'ddp'"),
    ({"methods": ("ddp", "sgd")}, "must be one of"),
    ({"methods": ("ddp", "localsgd@0")}, "an interval H >= 1"),
    ({"methods": ("ddp", "ddp@8")}, "DDP has no sync interval"),
    ({"methods": ("ddp", "palsgd", "palsgd")}, "repeats a run"),
    ({"steps": 100, "eval_every": 16}, "multiple of eval_every"),
    ({"model_size": "huge"}, "model_size='huge' is unknown"),
    ({"local_step_factor": 0.5}, "local_step_factor"),
    ({"pseudo_sync_prob": 0.0}, "pseudo_sync_prob"),
    ({"palsgd_warmup_steps": 320}, "leaves no local steps"),
])
def test_settings_refuse_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        BenchSettings(**overrides)


def test_settings_methods_share_everything_but_the_method():
    s = tiny_settings()
    assert s.max_steps("ddp") == s.steps and s.max_steps("palsgd") == round(s.steps * s.local_step_factor)
    assert s.palsgd_config("ddp") == {"method": "ddp", "seed": s.seed}
    local = [s.palsgd_config(m) for m in ("localsgd", "diloco", "palsgd")]
    assert {(c["sync_interval"], c["warmup_steps"], c["seed"]) for c in local} == {
        (s.sync_interval, s.palsgd_warmup_steps, s.seed)}
    # The pull c = lr*eta/p equals the requested coefficient.
    assert s.learning_rate * s.eta / s.pseudo_sync_prob == pytest.approx(s.pull_coefficient)
