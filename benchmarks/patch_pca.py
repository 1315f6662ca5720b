"""How many numbers per patch a dataset needs: the PSNR of the best *linear* patch code.

    python benchmarks/patch_pca.py --data DATA [--patch 8] [--dims 1,2,4,8,16,32,48] [--holdout 0.1]

Fits a PCA to the p x p x 3 patches of the dataset's training frames and reports the held-out frames'
reconstruction PSNR when each patch keeps its top ``k`` components, for every ``k`` in ``--dims``. A
tokenizer with k latent channels per patch (``tokenizer.latent_layout=patch tokenizer.latent_dim=k``)
or the same number of latent floats per frame in any layout should beat it; one below it is limited by
its training, not its bottleneck. Compare the result with copy-last at h = 1 (``worldflow eval``) to see
whether a tokenizer of that size *can* beat copy-last at all (docs/benchmarks.md, "The patch layout").
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from worldflow.data.dataset import EpisodeDataset
from worldflow.tokenizer.model import to_patches


def split_patches(data: str, split: str, holdout: float, patch: int, max_frames: int) -> np.ndarray:
    """Every frame of ``split`` (at most ``max_frames``, evenly spaced) -> patches (N, p*p*3) in [0, 1]."""
    import torch

    ds = EpisodeDataset(data, split, holdout_fraction=holdout)
    frames = np.concatenate([ds.load(i).frames for i in range(len(ds.episodes))])  # (F, H, W, 3) uint8
    if len(frames) > max_frames:  # evenly spaced: deterministic, covers every episode
        frames = frames[np.linspace(0, len(frames) - 1, max_frames).astype(int)]
    x = torch.from_numpy(frames).float().div(255.0)[None]  # (1, F, H, W, 3)
    return to_patches(x, patch)[0].reshape(-1, patch * patch * 3).numpy()


def pca_psnr(train: np.ndarray, held: np.ndarray, dims: list[int]) -> dict[int, float]:
    """Held-out PSNR (dB) of the rank-k PCA code fitted on ``train``, per k (patches (N, D) in [0, 1])."""
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)  # rows: principal directions
    out = {}
    for k in dims:
        v = vt[: min(k, len(vt))]
        recon = (held - mean) @ v.T @ v + mean
        mse = float(np.square(np.clip(recon, 0.0, 1.0) - held).mean())
        out[k] = -10.0 * np.log10(max(mse, 1e-10))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset directory (worldflow collect / import)")
    ap.add_argument("--patch", type=int, default=8, help="patch size in pixels (tokenizer.patch)")
    ap.add_argument("--dims", default="1,2,4,8,16,32,48", help="components kept per patch, comma-separated")
    ap.add_argument("--holdout", type=float, default=0.1, help="data.holdout_fraction of the runs compared")
    ap.add_argument("--max-frames", type=int, default=4000, help="frames used per split, at most")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args()
    dims = [int(d) for d in a.dims.split(",")]
    train = split_patches(a.data, "train", a.holdout, a.patch, a.max_frames)
    held = split_patches(a.data, "heldout", a.holdout, a.patch, a.max_frames)
    res = pca_psnr(train, held, dims)
    if a.json:
        print(json.dumps({"patch": a.patch, "psnr": res}))
        return
    d = a.patch * a.patch * 3
    print(f"| k per {a.patch}x{a.patch} patch | compression | held-out PSNR (dB) |\n|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {d / k:.1f}x | {v:.2f} |")


if __name__ == "__main__":
    main()
