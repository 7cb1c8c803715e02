"""Stopping and resuming ``python -m numpyro_nnef generate``: SIGINT mid-run exits 130 and keeps the
finished chunks, a rerun resumes them ("resumed N of M chunks") and gives a bit-identical dataset,
and a checkpoint directory of another run exits 2 naming the setting that differs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from numpyro_nnef.dataset import ExpectationDataset

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
seed = 5

[family]
name = "Gaussian"

[etas]
low = [-1.0, -2.0]
high = [1.0, -0.5]
num = 24

[sampler]
num_chains = 2
num_warmup = 100
num_samples = 200
chunk_size = 1
max_retries = 0
min_ess = 50
max_rhat = 1.1
fallback = "none"
"""


def cli(config: Path, ckpt: Path, output: Path, *extra: str) -> subprocess.Popen:
    # the persistent compilation cache lives beside the run: the resumed and the fresh run load
    # the interrupted run's compiled program, and must still match bit for bit
    env = dict(os.environ, NNEF_CACHE=str(config.parent / "cache"), PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.Popen(
        [sys.executable, "-m", "numpyro_nnef", "generate", "--config", str(config),
         "--checkpoint-dir", str(ckpt), "--output", str(output), "--no-progress", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigint_resume_is_bit_identical_and_foreign_checkpoints_exit_2(tmp_path):
    config = tmp_path / "gauss.toml"
    config.write_text(CONFIG)
    ckpt = tmp_path / "ckpt"
    proc = cli(config, ckpt, tmp_path / "resumed.npz")
    deadline = time.monotonic() + 240
    while not (ckpt / "chunk_00000.npz").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    kept = len(list(ckpt.glob("chunk_*.npz")))
    assert 1 <= kept < 24, kept
    assert not list(ckpt.glob(".*.tmp"))  # no half-written chunk
    assert list((tmp_path / "cache" / "xla").iterdir())  # the compiled sampler was kept

    resume = cli(config, ckpt, tmp_path / "resumed.npz")
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert f"resumed {kept} of 24 chunks" in err, err

    fresh = cli(config, tmp_path / "ckpt_fresh", tmp_path / "fresh.npz")
    _, err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, err
    a = ExpectationDataset.load(tmp_path / "resumed.npz")
    b = ExpectationDataset.load(tmp_path / "fresh.npz")
    for name in ("eta", "mean", "cov", "mcse", "ess_bulk", "ess_tail", "rhat", "divergences",
                 "passed"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name

    # another seed (so another key and other etas) must not reuse the directory
    other = cli(config, ckpt, tmp_path / "other.npz", "--seed", "6")
    _, err = other.communicate(timeout=300)
    assert other.returncode == 2, err
    assert "Traceback" not in err and "different run" in err and "key.data" in err, err
