"""bench/gpu_check.py without a GPU: runs what it can, names what it skipped, ends with one JSON line."""
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_mode_names_skipped_sections(tmp_path):
    assert not torch.cuda.is_available()  # this suite runs on CPU machines; on a GPU run the script itself
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench/gpu_check.py"), "--out", str(tmp_path / "o.json")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "o.json").read_text())
    assert set(report["skipped"]) == {"hier_attention", "contrastive", "flash_attn", "zero3_train.training"}
    assert all(reason == "no CUDA device" for name, reason in report["skipped"].items() if "." not in name)
    assert report["errors"] == {}
    # What does run on CPU: the recipe's config with the bench's overrides loads, the dry run and the shards.
    train = report["sections"]["zero3_train"]
    assert train["vision"] == "width 768, 12 layers, patch 16" and train["steps"] == 30 and train["shards"] == 4
    assert 140 < train["params_m"] < 200 and train["dry_run_zero3_model_states_gib"] > 0
