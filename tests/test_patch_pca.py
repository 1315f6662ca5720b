"""benchmarks/patch_pca.py: the linear patch-code bound is exact where it must be, and the script runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from patch_pca import pca_psnr  # noqa: E402


def test_rank_k_patches_are_exact_at_k_and_lossy_below():
    rng = np.random.default_rng(0)
    basis = rng.uniform(-0.2, 0.2, (2, 12))
    coef = rng.uniform(-1, 1, (600, 2))
    patches = 0.5 + coef @ basis  # rank 2 around a mean, inside [0, 1]
    res = pca_psnr(patches[:400], patches[400:], [1, 2])
    assert res[2] > 90  # exact up to float error (the PSNR eps caps it at 100 dB)
    # rank 1 keeps the stronger direction; the lost variance is the second one's, in closed form
    centred = patches[400:] - patches[:400].mean(0)
    assert res[1] < 60
    v = np.linalg.svd(patches[:400] - patches[:400].mean(0), full_matrices=False)[2][:1]  # top direction
    mse = np.square(centred - centred @ v.T @ v).mean()
    assert abs(res[1] - (-10 * np.log10(mse))) < 0.05


def test_script_runs_on_a_collected_dataset(tiny_data):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "patch_pca.py"), "--data", str(tiny_data),
                        "--patch", "4", "--dims", "1,48", "--holdout", "0.3", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)["psnr"]
    assert float(res["48"]) > float(res["1"])
