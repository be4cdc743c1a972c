"""The benchmark harness's pure parts: scenario files, statistics and ratios, window arithmetic, Markdown.

No timings are asserted: numbers are synthetic. The end-to-end smoke run (2 browsers, 2 frames, in namespaces
the test creates) needs root and Chromium and is marked like the other namespace tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report as bench_report
from bench.harness import window_from_frames
from bench.scenario import SCENARIO_DIR, ScenarioError, load_scenario, parse_scenario
from tilemesh.planning.planner import STRATEGIES

REPO = Path(__file__).resolve().parent.parent


def dev(name="phone", kind="phone", cores=0.5, mbps=50, delay_ms=10):
    return {"name": name, "kind": kind, "cores": cores, "mbps": mbps, "delay_ms": delay_ms}


def scenario(**over):
    raw = {"name": "t", "source": "phone", "devices": [dev(), dev("lap", "laptop", 1.0, 100, 5)]}
    raw.update(over)
    return raw


# --------------------------------------------------------------------------- scenarios


def test_shipped_scenarios_parse():
    default = load_scenario("default")
    assert default.source == "phone" and default.edge is not None and default.edge.name == "edge"
    assert [d.kind for d in default.devices] == ["phone", "phone", "laptop", "edge"]
    assert [d.cores for d in default.browsers] == [0.5, 0.35, 1.0]
    assert default.strategies == STRATEGIES
    assert {p.stem for p in SCENARIO_DIR.glob("*.toml")} >= {"default", "smoke"}
    for path in SCENARIO_DIR.glob("*.*"):
        load_scenario(path)


def test_defaults_and_overrides():
    sc = parse_scenario(scenario())
    assert (sc.frames, sc.repeats, sc.warmup, sc.model) == (8, 2, 2, "mobilenet_v2")
    sc2 = sc.with_overrides(frames=3, strategies=["single", "tilemesh"])
    assert sc2.frames == 3 and sc2.strategies == ("single", "tilemesh") and sc2.repeats == 2


def test_n_equal_phones_in_one_run():
    """heavy.toml: the camera phone alone, then tilemesh over the first 2, 3 and 4 phones, all in one run."""
    sc = load_scenario("heavy")
    assert sc.variant == "heavy" and sc.depth == 1 and len({(d.cores, d.mbps) for d in sc.devices}) == 1
    assert sum(d.cores for d in sc.devices) < 2  # fits the machine's 2 cores
    assert sc.windows() == [("single", "single", ("phone1",)),
                            ("tilemesh@2", "tilemesh", ("phone1", "phone2")),
                            ("tilemesh@3", "tilemesh", ("phone1", "phone2", "phone3")),
                            ("tilemesh@4", "tilemesh", ("phone1", "phone2", "phone3", "phone4")),
                            ("equal_split@2", "equal_split", ("phone1", "phone2")),
                            ("equal_split@3", "equal_split", ("phone1", "phone2", "phone3")),
                            ("equal_split@4", "equal_split", ("phone1", "phone2", "phone3", "phone4"))]
    normal = load_scenario("phones")
    assert normal.variant is None and normal.devices == sc.devices and normal.windows() == sc.windows()
    # Without device_counts every strategy is one window over every device; the source comes first.
    plain = parse_scenario(scenario(source="lap", strategies=["single", "tilemesh"], device_counts=[2]))
    assert plain.windows()[1] == ("tilemesh@2", "tilemesh", ("lap", "phone"))
    assert parse_scenario(scenario()).windows()[0] == ("single", "single", None)
    assert parse_scenario(sc.to_dict()) == sc


def test_json_and_toml_files_agree(tmp_path):
    raw = scenario(frames=4)
    (tmp_path / "a.json").write_text(json.dumps(raw))
    toml = ['name = "t"', 'source = "phone"', "frames = 4"]
    for d in raw["devices"]:
        toml += ["[[devices]]", *[f"{k} = {json.dumps(v)}" for k, v in d.items()]]
    (tmp_path / "a.toml").write_text("\n".join(toml))
    assert load_scenario(tmp_path / "a.json") == load_scenario(tmp_path / "a.toml")


@pytest.mark.parametrize(("change", "message"), [
    ({"source": "tablet"}, "source 'tablet' is not a device"),
    ({"devices": []}, "devices must be a non-empty list"),
    ({"devices": [dev(), dev()]}, "device names must be unique"),
    ({"devices": [dev(), dev("e1", "edge"), dev("e2", "edge")]}, "at most one edge"),
    ({"source": "e", "devices": [dev(), dev("e", "edge")]}, "the source must be a browser"),
    ({"devices": [dev(kind="tablet")]}, "kind must be one of"),
    ({"devices": [dev(cores=0)]}, "cores must be >= 0.01"),
    ({"devices": [dev(cores="fast")]}, "cores must be a number"),
    ({"devices": [dev(mbps=0)]}, "mbps must be > 0"),
    ({"devices": [dev(delay_ms=-1)]}, "delay_ms must be >= 0"),
    ({"devices": [dev(mbps=math.inf)]}, "mbps must be a number"),
    ({"devices": [{**dev(), "ram": 4}]}, "unknown key(s) ['ram']"),
    ({"devices": [{"name": "phone", "kind": "phone"}]}, "missing key(s) ['cores', 'delay_ms', 'mbps']"),
    ({"devices": [dev(name="my phone")]}, "name must be letters"),
    ({"frames": 0}, "frames must be an integer >= 1"),
    ({"repeats": 1.5}, "repeats must be an integer"),
    ({"frames": True}, "frames must be an integer"),
    ({"strategies": ["single", "magic"]}, "unknown strategies ['magic']"),
    ({"strategies": ["single", "single"]}, "strategies listed twice"),
    ({"model": "resnet50"}, "model must be one of"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"variant": "he avy"}, "variant must be the name"),
    ({"device_counts": [2, 3]}, "device_counts must be distinct integers in 2..2"),
    ({"device_counts": [1]}, "device_counts must be"),
    ({"device_counts": [2, 2]}, "device_counts must be"),
    ({"depth": -1}, "depth must be an integer >= 0"),
])
def test_bad_scenarios_say_what_is_wrong(change, message):
    with pytest.raises(ScenarioError) as err:
        parse_scenario(scenario(**change), "x.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("x.toml")


def test_bad_files(tmp_path):
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "missing.toml")
    with pytest.raises(ScenarioError, match="no such scenario file .*default"):
        load_scenario("nonexistent")
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(ScenarioError, match="broken.toml: not valid TOML"):
        load_scenario(tmp_path / "broken.toml")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ScenarioError, match="not valid JSON"):
        load_scenario(tmp_path / "broken.json")
    (tmp_path / "s.yaml").write_text("name: x")
    with pytest.raises(ScenarioError, match=r"\.toml or \.json"):
        load_scenario(tmp_path / "s.yaml")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ScenarioError, match="must be a table/object"):
        load_scenario(tmp_path / "list.json")


def test_check_flag_validates_without_root(capsys):
    from bench.harness import main

    assert main(["smoke", "--check", "--frames", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 5
    assert main(["smoke", "--check", "--strategies", "single,bogus"]) == 2
    assert "unknown strategies ['bogus']" in capsys.readouterr().err


def test_tilemesh_bench_subcommand_passes_everything_through(capsys):
    from tilemesh import cli

    assert cli.main(["bench", "smoke", "--check", "--repeats", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["repeats"] == 3


# --------------------------------------------------------------------------- statistics


def test_percentile_matches_linear_interpolation():
    assert bench_report.percentile([5], 90) == 5
    assert bench_report.percentile([1, 2, 3, 4], 50) == 2.5
    assert bench_report.percentile(range(1, 11), 90) == pytest.approx(9.1)
    assert bench_report.percentile([3, 1, 2], 0) == 1 and bench_report.percentile([3, 1, 2], 100) == 3
    with pytest.raises(ValueError):
        bench_report.percentile([], 50)
    with pytest.raises(ValueError):
        bench_report.percentile([1], 101)


def win(strategy, lat, wall=None, **kw):
    base = {"strategy": strategy, "ok": True, "latencies_ms": lat, "wall_ms": wall or sum(lat),
            "top1": ["cup"] * len(lat)}
    base.update(kw)
    return base


WINDOWS = [
    win("single", [400, 420, 380], source_cpu_s=1.2, predicted_ms=390, label="source alone", edge_mac_share=0.0),
    win("partition_offload", [200, 220], source_cpu_s=0.2, edge_cpu_s=0.1, edge_mac_share=0.9,
        bytes_per_frame=150_000, predicted_ms=180),
    win("tilemesh", [100, 120, 110, 90], source_cpu_s=0.4, edge_cpu_s=0.04, edge_mac_share=0.25,
        bytes_per_frame=900_000, predicted_bytes_per_frame=1_000_000, predicted_ms=95,
        top1=["cup", "cup", "cup", "mug"]),
    win("single", [410], source_cpu_s=0.4, predicted_ms=410),
    {"strategy": "offload", "ok": False, "latencies_ms": [], "error": "edge peer has no compute profile"},
]


def test_summary_pools_windows():
    s = bench_report.summarize(WINDOWS, "cup")
    assert list(s) == ["single", "partition_offload", "tilemesh", "offload"]
    single = s["single"]
    assert single["frames"] == 4 and single["windows_ok"] == 2
    assert single["median_ms"] == 405 and single["p90_ms"] == pytest.approx(417.0)
    assert single["fps"] == pytest.approx(4 / (1610 / 1e3))
    assert single["source_cpu_s_per_frame"] == pytest.approx(1.6 / 4)
    assert single["edge_cpu_s_per_frame"] is None
    assert single["predicted_ms"] == 400
    assert s["tilemesh"]["top1_agreement"] == 0.75
    assert s["tilemesh"]["edge_cpu_s_per_frame"] == pytest.approx(0.01)
    assert s["offload"]["frames"] == 0 and s["offload"]["errors"] == ["edge peer has no compute profile"]
    assert "median_ms" not in s["offload"]


def test_ratios_against_both_baselines():
    r = bench_report.ratios(bench_report.summarize(WINDOWS, "cup"))
    t = r["tilemesh"]
    assert t["single"]["latency"] == pytest.approx(405 / 105)
    assert t["partition_offload"]["latency"] == pytest.approx(210 / 105)
    assert t["partition_offload"]["phone_cpu"] == pytest.approx((0.2 / 2) / (0.4 / 4))
    assert t["partition_offload"]["edge_cpu"] == pytest.approx((0.1 / 2) / (0.04 / 4))
    assert t["single"]["edge_cpu"] is None  # single uses no edge: no ratio rather than a division by zero
    assert "single" not in r["single"] and r["offload"] == {}
    assert bench_report.ratio(None, 1) is None and bench_report.ratio(2, 0) is None
    assert bench_report.ratio(3, 1.5) == 2


def test_ratio_lines_lead_with_the_baselines():
    lines = bench_report.ratio_lines(bench_report.summarize(WINDOWS, "cup"))
    assert lines[0].startswith("tilemesh vs single device: median latency 3.86x")
    assert lines[1].startswith("tilemesh vs partition-offloading: median latency 2.00x")
    only_single = bench_report.summarize([WINDOWS[0], WINDOWS[2]], "cup")
    assert "no comparison (not measured in this run)" in bench_report.ratio_lines(only_single)[1]


def test_markdown_table_and_report():
    summary = bench_report.summarize(WINDOWS, "cup")
    table = bench_report.markdown_table(summary)
    rows = table.splitlines()
    assert rows[0].count("|") == len(bench_report.COLUMNS) + 1
    assert all(row.count("|") == rows[0].count("|") for row in rows), table
    tm = next(r for r in rows if r.startswith("| tilemesh"))
    assert "| 105 |" in tm and "900 (pred. 1000)" in tm and "3.86x" in tm and "25%" in tm
    assert "not measured: edge peer has no compute profile" in next(r for r in rows if r.startswith("| offload"))
    result = {"summary": summary, "scenario": parse_scenario(scenario()).to_dict(), "shaping": "tbf",
              "emulation_notes": ["delays NOT emulated"], "notes": ["edge skipped"], "machine": {"cores": 2}}
    md = bench_report.render_markdown(result)
    assert md.index("## Ratios") < md.index("## Per strategy") < md.index("## Emulation")
    assert "delays NOT emulated" in md and "- edge skipped" in md
    perf = bench_report.performance_section(result)
    assert perf.startswith("## Performance") and "2 cores" in perf and table in perf
    assert "measured median / predicted latency: single 1.01x, partition_offload 1.17x, tilemesh 1.11x" in perf


def test_window_from_frames_counts_bytes_once_per_device_and_frame():
    plan = {"plan_id": 7, "source": "P1", "label": "split over P1,P2", "predicted_ms": 90, "devices": ["P1", "P2", "E"],
            "timeline": {"devices": {"P1": {"macs": 100, "bytes_sent": 1000}, "P2": {"macs": 100, "bytes_sent": 500},
                                     "E": {"macs": 200, "bytes_sent": 40}}}}
    frames = [{"t0": 0, "t1": 100, "strategy": "tilemesh", "plan_id": 7, "top1": "cup",
               "report": {"device": "P1", "frame": 9, "bytes_sent": 1000, "compute_ms": 60.0}},
              {"t0": 110, "t1": 230, "strategy": "tilemesh", "plan_id": 7, "top1": "cup",
               "report": {"device": "P1", "frame": 10, "bytes_sent": 1000, "compute_ms": 80.0}},
              {"t0": 240, "t1": 300, "strategy": None, "plan_id": None, "top1": "cup", "report": None}]
    reports = [{"plan_id": 7, "report": {"device": "P2", "frame": 9, "bytes_sent": 500, "compute_ms": 30.0}},
               {"plan_id": 7, "report": {"device": "P2", "frame": 9, "bytes_sent": 500}},   # page + broadcast
               {"plan_id": 7, "report": {"device": "P2", "frame": 8, "bytes_sent": 999}},   # a warm-up frame
               {"plan_id": 6, "report": {"device": "E", "frame": 9, "bytes_sent": 7}}]      # an older plan
    w = window_from_frames("tilemesh", frames, reports, plan, {"P1": "phone", "P2": "laptop", "E": "edge"}, "E")
    assert w["latencies_ms"] == [100, 120] and w["fallback_frames"] == 1 and w["wall_ms"] == 300
    assert w["plan_ids"] == [7]
    assert w["bytes_sent_by_device"] == {"phone": 1000, "laptop": 500}
    assert w["bytes_per_frame"] == 1500 and w["predicted_bytes_per_frame"] == 1540
    assert w["compute_ms_by_device"] == {"phone": 70.0, "laptop": 30.0}  # mean over frames, each frame once
    assert w["edge_mac_share"] == 0.5 and w["bytes_missing_devices"] == ["edge"]
    assert w["label"] == "split over phone,laptop" and w["devices"] == ["phone", "laptop", "edge"]
    none = window_from_frames("tilemesh", frames[2:], [], None, {}, None)
    assert not none["ok"] and "fell back" in none["error"]


# --------------------------------------------------------------------------- end to end (root only)


@pytest.mark.browser
@pytest.mark.netns
def test_smoke_run_in_namespaces(tmp_path):
    from bench.env import unavailable_reason

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    if not (REPO / "static/model/mobilenet_v2.onnx").exists():
        pytest.skip("browser assets missing: run `python -m tilemesh.server.assets`")
    res = subprocess.run([sys.executable, "-m", "bench.harness", "smoke", "--frames", "2", "--no-plots",
                          "--strategies", "single,tilemesh", "--results", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    result = json.loads((out / "results.json").read_text())
    for strategy in ("single", "tilemesh"):
        s = result["summary"][strategy]
        assert s["frames"] == 2, s
        assert s["top1_agreement"] == 1.0, s
        assert s["source_cpu_s_per_frame"] > 0
    assert result["summary"]["single"]["bytes_per_frame"] == 0
    assert "| tilemesh |" in (out / "results.md").read_text()
    assert (out / "README-performance.md").read_text().startswith("## Performance")
    assert not (tmp_path / "README-performance.md").exists()  # only the default scenario speaks for the README
