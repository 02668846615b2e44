"""SIGKILL a real `retdmctl train` process mid-run; the same command then resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from retdmctl.runtime import load_checkpoint

CONFIG = """
[ingest]
demo_images = 80
demo_classes = 5
workers = 1
[model]
backbone = "tiny_cnn"
pretrained = false
image_size = 32
batch_size = 16
[runtime]
workers = 0
device = "cpu"
[classifier]
epochs = 40
[decision]
folds = 0
"""


def retdmctl(workdir, *args):
    return [sys.executable, "-m", "retdmctl", "--workdir", str(workdir), *args]


@pytest.mark.slow
def test_kill_9_during_training_then_resume(tmp_path):
    (tmp_path / "retdm.toml").write_text(CONFIG)
    env = {**os.environ, "RETDM_NO_PROGRESS": "1"}
    subprocess.run(retdmctl(tmp_path, "ingest", "demo"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(retdmctl(tmp_path, "train", "--stage", "classifier"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = tmp_path / "classifier" / "resume.pt"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if resume.exists() and load_checkpoint(resume)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(resume)["epoch"]  # resume.pt is whole: written then renamed
    assert not (tmp_path / "classifier" / "checkpoint.pt").exists()

    done = subprocess.run(retdmctl(tmp_path, "train", "--stage", "classifier"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming after epoch {killed_at} of 40" in done.stdout
    final = load_checkpoint(tmp_path / "classifier" / "checkpoint.pt")
    assert [h["epoch"] for h in final["history"]] == list(range(1, 41))
