"""Run logging: one JSONL file (``metrics.jsonl``) plus TensorBoard scalars/images, and a progress bar.

Every long job writes into a run directory; people look at TensorBoard, scripts read the JSONL.
TensorBoard is optional at import time (a missing install only disables that sink).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Logs scalars to ``<run>/<phase>/metrics.jsonl`` and TensorBoard, and drives a tqdm bar.

    ``phase`` separates tokenizer/dynamics/agent logs inside one run directory.
    """

    def __init__(self, run_dir: str | Path, phase: str, total: int | None = None, initial: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.dir = Path(run_dir) / phase
        self.dir.mkdir(parents=True, exist_ok=True)
        self.phase = phase
        self._jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is a convenience, never a failure
                self._tb = None
        self._bar = tqdm(total=total, initial=initial, desc=phase, dynamic_ncols=True, disable=not progress)
        self._t0 = time.time()

    def log(self, step: int, **scalars: Any) -> None:
        """Write one JSONL record and TensorBoard scalars for ``step``."""
        rec = {"step": step, "time": round(time.time() - self._t0, 3)}
        rec.update({k: _jsonable(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{self.phase}/{k}", v, step)
        shown = {k: f"{v:.4g}" for k, v in rec.items() if k not in ("step", "time") and isinstance(v, float)}
        self._bar.set_postfix(shown, refresh=False)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        """Log an HxWx3 uint8 image to TensorBoard."""
        if self._tb is not None:
            self._tb.add_image(f"{self.phase}/{tag}", img, step, dataformats="HWC")

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def write(self, msg: str) -> None:
        self._bar.write(msg)

    def close(self) -> None:
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
