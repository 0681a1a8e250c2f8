"""benchmarks/bench_gpu.py keeps working: its tiny run on the CPU measures or skips (with a reason)
every case, and reports ours/diffusers ratios for each pair where both sides ran."""
import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks", "bench_gpu.py")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)           # light: no framework is imported at module level
    return module


def test_tiny_run_measures_or_skips_every_case(tmp_path):
    bench = _bench_module()
    stem = str(tmp_path / "gpu")
    proc = subprocess.run([sys.executable, BENCH, "--tiny", "--out", stem], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(stem + ".json") as f:
        report = json.load(f)
    cases = {r["case"]: r for r in report["cases"]}
    assert list(cases) == bench.CASES
    for name, r in cases.items():
        assert r["status"] in ("measured", "skipped"), (name, r.get("reason"), r.get("traceback"))
        if r["status"] == "measured":
            assert r["seconds"] > 0 and all(t > 0 for t in r["times"]), name
            assert r["peak_mb"] > 0, name
            assert r["precision"] == ("fp16" if report["env"]["device_kind"] == "cuda" else "fp32"), name
        else:
            assert r["reason"].strip(), name
    # the cases that cannot fail on a CPU with this environment do run
    for name in ("base_ours", "base_diffusers", "gc_ours", "lora_ours", "lora_diffusers", "sample_ours",
                 "sample_diffusers", "fused_ours", "cache_all_ours", "frozen_text_diffusers"):
        assert cases[name]["status"] == "measured", (name, cases[name].get("reason"))
    for pair in bench.PAIRS:           # a saver diffusers lacks is compared with diffusers doing without it
        against = f"{bench.REFERENCE.get(pair, pair)}_diffusers"
        both = all(cases.get(c, {}).get("status") == "measured" for c in (f"{pair}_ours", against))
        if both:
            ratio = report["ratios"][pair]
            assert ratio["time_ours_over_diffusers"] > 0 and ratio["memory_ours_over_diffusers"] > 0, pair
            assert ratio["against"] == against
        else:
            assert pair not in report["ratios"], pair
    assert report["ratios"]["cache_all"]["against"] == "frozen_text_diffusers"
    assert report["env"]["torch"] and report["env"]["diffusers"]
    with open(stem + ".md") as f:
        text = f.read()
    assert "| base_ours |" in text and "ours / diffusers" in text and "(against frozen_text_diffusers)" in text
    if report["env"]["device_kind"] == "cpu":
        assert "fp32" in report["note"] and "CPU" in text


def test_unknown_case_is_refused():
    proc = subprocess.run([sys.executable, BENCH, "--tiny", "--cases", "nonesuch"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "unknown case nonesuch" in proc.stderr
