"""The GPU check's CPU fallback: the same build → export → interleaved timing path, at a tiny size, in CI."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check runs at full size (minutes)")
def test_gpu_check_runs_its_cpu_fallback_and_says_no_gpu_was_found(tmp_path, capsys, one_thread):
    from benchmarks import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--repeats", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "no GPU found" in captured.err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["gpu"] is False and report["setting"]["model"] == "random:sd-tiny"
    assert report["build"]["params"]["pruned"] < report["build"]["params"]["dense"]
    for runtime in ("torch", "onnxruntime"):
        for batch in ("batch_1", "batch_2"):
            latency = report["latency"][runtime][batch]
            assert latency["dense"]["repeats"] == 2 and latency["ratio"] > 0
    assert report["phases"]["build"]["host_peak_rss_mib"] > 0
    dense, pruned = report["fusions"]["dense"]["attention"], report["fusions"]["pruned"]["attention"]
    assert dense["enabled"] and dense["fused"] == dense["sites"] > 0 and pruned["fused"] == pruned["sites"]
    assert "| attention | " in captured.out
    assert "| onnxruntime | 2 |" in captured.out and (tmp_path / "report.md").is_file()
