"""Sweeps: a 2-process torchrun sweep over the planted model, killed mid-way and restarted, equals a
single-process run; finished shards are skipped."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from attnrules.cli import main

ARGS = ["--max-rules", "16", "--exhaustive-k", "0", "--no-counting", "--n-sequences", "2000", "--quiet"]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _torchrun(out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "attnrules.cli", "sweep", *ARGS, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env,
        cwd=out.parent,  # not the repository root, whose source tree would shadow the installed package
    )


def _merged(out: Path) -> dict:
    keys = ["layer", "head", "feature"]
    frames = {}
    for name in ("metrics", "features", "rules", "distractors"):
        frame = pd.read_parquet(out / "merged" / f"{name}.parquet")
        if frame.empty:
            frames[name] = frame
            continue
        order = keys + [c for c in ("method", "num_rules", "rank") if c in frame.columns]
        frames[name] = frame.sort_values(order).reset_index(drop=True)
    return frames


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_killed_torchrun_sweep_resumes_and_equals_single_process(tmp_path, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    single = tmp_path / "single"
    assert main(["sweep", *ARGS, "--out", str(single)]) == 0
    assert "layer" in capsys.readouterr().out

    multi = tmp_path / "multi"
    multi.mkdir()
    proc = _torchrun(multi)
    first = multi / "shards" / "L0H0" / "features"
    deadline = time.time() + 240
    while not (first.exists() and any(first.glob("*.json"))):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the sweep never started a feature"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((multi / "manifest").glob("*.json"))) < 2, "killed too late: nothing left to resume"

    proc = _torchrun(multi)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert sorted(p.name for p in (multi / "manifest").glob("*.json")) == ["L0H0.json", "L0H1.json"]
    got, want = _merged(multi), _merged(single)
    for name in want:
        assert not got[name].duplicated(subset=[c for c in got[name].columns if c != "text"]).any()
        pd.testing.assert_frame_equal(got[name], want[name])
    assert (multi / "summary.csv").read_text() == (single / "summary.csv").read_text()

    assert main(["sweep", *ARGS, "--out", str(multi)]) == 0
    err = capsys.readouterr().err
    assert "L0H0: already done, skipped" in err and "L0H1: already done, skipped" in err
