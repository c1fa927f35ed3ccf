"""Where training metrics go: a JSONL file, TensorBoard event files, and the console."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

import jax
import numpy as np

from speechverse_jax import fs

def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)) and np.ndim(v) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Writes on process 0 only; every record carries `step` and a `kind` (train / eval / event).

    A remote run folder (gs://...) gets its files through a local mirror that `sync()` copies up
    (at every checkpoint and at the end), since object stores cannot append.
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        import tempfile

        self.enabled = jax.process_index() == 0
        self.workdir = str(workdir)
        self.remote = fs.is_remote(self.workdir)
        local = tempfile.mkdtemp(prefix="speechverse-metrics-") if self.remote else self.workdir
        self.path = os.path.join(local, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(local, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
                except ImportError:  # pragma: no cover
                    self._tb = None

    def write(self, step: int, kind: str, values: Dict[str, object]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))

    def sync(self) -> None:
        """Copy the JSONL up to a remote run folder (no-op for a local one)."""
        if self.enabled and self.remote:
            self._file.flush()
            fs.copy(self.path, f"{self.workdir}/metrics.jsonl")

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self.sync()
            if self._tb is not None:
                self._tb.close()


def read_metrics(path: str, kind: Optional[str] = None):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def plot_losses(metrics_paths: Dict[str, str], out_png: str) -> str:
    """Train (and eval) loss curves of one or more runs (e.g. curriculum stages) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0  # runs given in order (curriculum stages) are drawn one after another
    for name, path in metrics_paths.items():
        train = read_metrics(path, "train")
        evals = read_metrics(path, "eval")
        if train:
            ax.plot([offset + r["step"] for r in train], [r["loss"] for r in train], label=f"{name} train")
        if evals:
            ax.plot([offset + r["step"] for r in evals], [r["loss"] for r in evals], "o-", label=f"{name} val")
        if len(metrics_paths) > 1 and (train or evals):
            offset += max(r["step"] for r in train + evals)
            ax.axvline(offset, color="gray", lw=0.5, ls="--")
    ax.set_xlabel("step (stages one after another)" if len(metrics_paths) > 1 else "step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
