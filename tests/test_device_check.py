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
