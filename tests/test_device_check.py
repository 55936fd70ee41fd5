"""benchmarks/device_check.py runs its reduced CPU version end to end (CI exercises the GPU script's code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_reduced_device_check_runs_and_meets_the_non_timing_goals(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--steps", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["syncs"].values()) == {"pass"}, result["syncs"]
    assert result["goals"]["zero_syncs"] and result["goals"]["amp_sam_extra_memory<=1x_params"]
    overflow = result["fp16_overflow"]
    assert overflow["theta_bit_identical"] is True and overflow["backed_off"] is True
    cells = result["step_cost"]
    assert {"cnn1d/fp32", "cnn1d/bf16"} <= set(cells)
    assert all(v["s_per_step"] > 0 for cell in cells.values() for v in cell.values())
    assert all(v > 0 for v in result["augment_images_per_s"].values())
    assert "goals:" in proc.stdout and "memory over ERM" in proc.stdout


def test_channels_last_is_skipped_saying_why_for_models_without_4d_inputs():
    """The default CPU model cnn1d takes 3-D batches: its channels_last cell is skipped, not a crash."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert "channels_last skipped for cnn1d" in check.skipped("cnn1d", "channels_last")
    assert check.skipped("preactresnet18", "channels_last") is None and check.skipped("cnn1d", "fp32") is None
