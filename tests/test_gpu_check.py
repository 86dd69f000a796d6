"""`make gpu-check` in its dry mode (CPU, tiny models): every check of the GPU script runs and passes."""

from __future__ import annotations

import json
import sys

from pipeline import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_the_gpu_check_runs_dry_on_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    assert gpu_check.main(["--dry", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dry"] and set(report["checks"]) == {"stage0_torchscript", "stage1_masks"} | {
        f"{check} {model}" for model in ("deeplabv3plus-tiny", "segformer-tiny")
        for check in ("unimatch_stage2", "eval_sliding")} | {
        "train_resume deeplabv3plus-tiny crop 32", "train_resume segformer-tiny crop 32"}
    assert report["checks"]["unimatch_stage2 segformer-tiny"]["ema"] == 0.99
    assert all(check["ok"] for check in report["checks"].values())
    resumed = report["checks"]["train_resume segformer-tiny crop 32"]
    assert resumed["weight_drift_resumed_vs_straight"] == resumed["weight_drift_straight_vs_straight"] == 0.0  # exact on CPU
    for row in report["throughput"].values():
        assert row["fast"]["images_per_s"] > 0 and row["fp32"]["images_per_s"] > 0 and "speedup_fast_vs_fp32" in row


def test_without_cuda_the_real_check_says_so(capsys):
    if gpu_check.torch.cuda.is_available():
        return
    assert gpu_check.main([]) == 2
    assert "no CUDA device here" in capsys.readouterr().out


def test_the_isolated_throughput_job_the_gpu_run_uses():
    script = str(PROJECT_ROOT / "benchmarks" / "bench_train.py")
    result, rss = gpu_check.measure(script, ["deeplabv3plus-tiny", "32", "2", "cpu", "fp32", "--steps", "1"])
    assert result["images_per_s"] > 0 and rss > 0
