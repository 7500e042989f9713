"""The demo's emulated link (palsgd_hf/cli/demo_link.py) and its table, on hand-made eval histories.

The link model charges each evaluation point its bytes and collectives so far; time to a target is
the first point at or below it, or "not reached". The numbers here are chosen so that every
expected value can be checked by hand: 12.5 MB at 100 Mbit/s is 1 s.
"""

from __future__ import annotations

import argparse
import json

import pytest

from palsgd_hf.cli.demo_link import Link, compare, dedup, modeled_curve, parse_mbit, time_to_loss
from palsgd_hf.cli.demo_report import format_table, plot_curves, write_summary

MB_PER_SECOND_AT_100 = 12.5e6  # bytes that take 1 s at 100 Mbit/s


def point(step, loss, train_s, mb_seconds, calls=0.0):
    return {"step": step, "eval_loss": loss, "elapsed_s": train_s + 0.5, "train_s": train_s,
            "comm_bytes": mb_seconds * MB_PER_SECOND_AT_100, "comm_calls": calls}


def result(history, final, syncs=0.0):
    return {"final_eval_loss": final, "world_size": 2, "eval_history": history,
            "palsgd": {"comm_bytes": history[-1]["comm_bytes"], "outer_syncs": syncs}}


# DDP: 1 s of traffic per 10 s of compute; PALSGD: less traffic, a bit less compute, a worse final loss.
DDP = [point(0, 7.0, 0.0, 0.0), point(10, 5.0, 10.0, 10.0, 10), point(20, 4.0, 20.0, 20.0, 20),
       point(20, 4.0, 20.2, 20.0, 20)]  # the final evaluation repeats the last step
FAST = [point(0, 7.0, 0.0, 0.0), point(10, 4.5, 9.0, 2.0, 3), point(20, 3.9, 18.0, 3.0, 5),
        point(20, 3.9, 18.1, 3.0, 5)]
SLOW = [point(0, 7.0, 0.0, 0.0), point(10, 5.2, 9.0, 2.0, 3), point(20, 4.3, 18.0, 3.0, 5),
        point(20, 4.3, 18.1, 3.0, 5)]


def test_modeled_time_charges_bytes_and_latency():
    curve = modeled_curve(DDP, Link(100.0), world=2)
    assert [p["step"] for p in curve] == [0, 10, 20]
    assert curve[-1]["measured_s"] == 20.2  # the final evaluation's entry is kept
    assert [p["modeled_s"] for p in curve] == pytest.approx([0.0, 20.0, 40.2])
    # 2 processes: 20 collectives x 2 hops x 5 ms = 0.2 s more; 4 processes: 1.5x the bytes, 6 hops each
    assert modeled_curve(DDP, Link(100.0, latency_ms=5), 2)[-1]["modeled_s"] == pytest.approx(40.4)
    assert modeled_curve(DDP, Link(100.0), 4)[-1]["modeled_s"] == pytest.approx(20.2 + 30.0)
    off = modeled_curve(DDP, Link(None), 2)
    assert all(p["modeled_s"] == p["measured_s"] for p in off)
    assert modeled_curve(DDP, Link(1000.0), 1)[-1]["modeled_s"] == 20.2  # one process sends nothing
    assert Link(100.0).formula(2) == "measured training s + bytes sent x 8 / 100 Mbit/s"
    assert Link(10.0, 2).formula(4) == ("measured training s + 2(n-1)/n x bytes sent x 8 / 10 Mbit/s"
                                        " + collectives x 2(n-1) hops x 2 ms")


def test_time_to_loss_is_a_point_on_the_curve_or_none():
    curve = modeled_curve(FAST, Link(100.0), 2)
    hit = time_to_loss(curve, 4.5)
    assert hit is curve[1] and hit["modeled_s"] == pytest.approx(11.0)  # 9 s + 2 s, no interpolation
    assert time_to_loss(curve, 3.0) is None
    assert time_to_loss(curve, 3.9 - 1e-7) is curve[2]  # within the tolerance of the final loss


def test_compare_palsgd_ahead_of_ddp():
    modeled = compare({"ddp": result(DDP, 4.0), "palsgd": result(FAST, 3.9, syncs=2)}, Link(100.0))
    ddp, palsgd = modeled["ddp"], modeled["palsgd"]
    assert ddp["reached"] and ddp["time_to_target_s"] == pytest.approx(40.2) and ddp["x_ddp"] == 1.0
    # PALSGD's first point at or below 4.0 is step 20 (3.9): 18.1 + 3 s, not step 10's 4.5
    assert palsgd["time_to_target_step"] == 20 and palsgd["time_to_target_s"] == pytest.approx(21.1)
    assert palsgd["x_ddp"] == pytest.approx(21.1 / 40.2)
    assert palsgd["modeled_s"] >= palsgd["measured_s"] and ddp["link"]["emulated"] is True
    table = format_table({"ddp": result(DDP, 4.0), "palsgd": result(FAST, 3.9, 2)}, modeled, Link(100.0))
    assert "EMULATED 100 MBIT/S" in table and "modeled s @100Mbit" in table and "0.52" in table


def test_compare_not_reached_is_said_with_the_final_loss():
    results = {"ddp": result(DDP, 4.0), "palsgd": result(SLOW, 4.3, syncs=2)}
    modeled = compare(results, Link(100.0))
    palsgd = modeled["palsgd"]
    assert not palsgd["reached"] and palsgd["time_to_target_s"] is None and palsgd["x_ddp"] is None
    # Both reach the worse final loss, 4.3: DDP at step 20 (40.2 s), PALSGD at its end (21.1 s)
    assert palsgd["common_loss"] == 4.3 and palsgd["time_to_common_s"] == pytest.approx(21.1)
    assert modeled["ddp"]["time_to_common_s"] == pytest.approx(40.2)
    table = format_table(results, modeled, Link(100.0))
    row = next(line for line in table.splitlines() if line.startswith("palsgd "))
    assert "not reached (final 4.3000)" in row and row.rstrip().endswith("-")
    assert "All methods reach 4.3000" in table


def test_link_off_and_no_ddp_run():
    modeled = compare({"palsgd": result(FAST, 3.9)}, Link(None))
    assert modeled["palsgd"]["target_loss"] is None and modeled["palsgd"]["modeled_s"] == 18.1
    assert "Link: none" in format_table({"palsgd": result(FAST, 3.9)}, modeled, Link(None))
    with pytest.raises(ValueError, match="no comm_bytes"):
        modeled_curve([{"step": 0, "eval_loss": 1.0, "elapsed_s": 0.0}], Link(100.0), 2)


def test_link_option_parsing():
    assert parse_mbit("100") == 100.0 and parse_mbit("2.5") == 2.5
    assert parse_mbit("0") is None and parse_mbit("none") is None and parse_mbit("OFF") is None
    for bad in ("-5", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mbit(bad)
    with pytest.raises(ValueError, match="latency"):
        Link(100.0, latency_ms=-1)
    assert [h["step"] for h in dedup(DDP)] == [0, 10, 20]


def test_summary_and_plot_files(tmp_path):
    pytest.importorskip("matplotlib")
    results = {"ddp": result(DDP, 4.0), "palsgd": result(SLOW, 4.3, 2)}
    modeled = compare(results, Link(100.0))
    write_summary(results, modeled, tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["palsgd"]["modeled"]["reached"] is False and summary["ddp"]["modeled"]["link"]["mbit"] == 100.0
    plot_curves(results, modeled, Link(100.0), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_report_only_recharges_saved_runs(tmp_path, capsys):
    """``palsgd-hf demo --report_only``: the runs under --output_dir, reported at another link, no training."""
    pytest.importorskip("matplotlib")
    from palsgd_hf.cli import demo

    assert demo.main(["--report_only", "--output_dir", str(tmp_path)]) == 2  # nothing there yet
    assert "no run to report" in capsys.readouterr().err
    for method, (history, final) in {"ddp": (DDP, 4.0), "palsgd": (FAST, 3.9)}.items():
        (tmp_path / method).mkdir()
        (tmp_path / method / "result.json").write_text(json.dumps(result(history, final, 2)))
    assert demo.main(["--report_only", "--output_dir", str(tmp_path), "--link_mbit", "50"]) == 0
    table = capsys.readouterr().out
    assert "EMULATED 50 MBIT/S" in table  # 20 s of DDP traffic at 100 Mbit/s are 40 s at 50
    assert json.loads((tmp_path / "summary.json").read_text())["ddp"]["modeled"]["modeled_s"] == pytest.approx(60.2)
