"""The training CLI end to end on small synthetic data: train, resume, compare, ablate, plot, errors."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from pwlu.app.cli import main
from pwlu.app.config import TrainConfig
from pwlu.app.data import load_fashion_mnist, read_idx
from pwlu.app.train import train

FAST = ["--dataset", "synthetic", "--batch-size", "64", "--no-progress"]


def test_train_one_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "2", "--warmup-epochs", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and len(metrics["history"]) == 2
    assert 0.0 <= metrics["final_test_acc"] <= 1.0
    assert (out / "metrics.csv").read_text().startswith("epoch,")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    # phase I ended after epoch 1: the PWLU boundaries moved away from the initial [-3, 3]
    lefts = [v for k, v in ckpt["model"].items() if k.endswith("left_bound")]
    assert lefts and not all(torch.all(v == -3.0) for v in lefts)
    assert "final test accuracy" in capsys.readouterr().out


def test_training_learns_the_synthetic_task(tmp_path):
    res = train(TrainConfig(model="cnn", activation="relu", dataset="synthetic", epochs=3, warmup_epochs=0,
                            batch_size=64, out=str(tmp_path / "r"), progress=False))  # fmt: skip
    assert res["final_test_acc"] > 0.5  # 4 classes: chance is 0.25


@pytest.mark.parametrize("activation", ["pwlu", "relu"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, activation):
    common = dict(model="cnn", activation=activation, dataset="synthetic", epochs=3, warmup_epochs=1, batch_size=64,
                  progress=False)  # fmt: skip
    full = train(TrainConfig(**common, out=str(tmp_path / "full")))
    # "killed" after 2 epochs (the checkpoint of epoch 2 is on disk), then resumed
    train(TrainConfig(**common, out=str(tmp_path / "cut"), stop_after=2))
    assert not json.loads((tmp_path / "cut" / "metrics.json").read_text())["finished"]
    resumed = train(TrainConfig(**common, out=str(tmp_path / "cut")), resume=True)
    assert [h["test_acc"] for h in resumed["history"]] == [h["test_acc"] for h in full["history"]]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compare_and_ablate_tables(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", *FAST, "--epochs", "2", "--warmup-epochs", "1", "--models", "cnn",
            "--activations", "relu", "pwlu", "--seeds", "0", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    table = (out / "table.md").read_text()
    assert "| cnn | relu |" in table and "| cnn | pwlu |" in table and "±" in table
    rows = (out / "runs.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4
    out = tmp_path / "abl"
    args = ["ablate", *FAST, "--epochs", "2", "--warmup-epochs", "1", "--variants", "fix-init-3",
            "stat-realign (layer)", "N=4", "--seeds", "0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    table = (out / "table.md").read_text()
    for variant in ("fix-init-3", "stat-realign (layer)", "N=4"):
        assert f"| {variant} |" in table


def test_plot_writes_png_files(tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *FAST, "--epochs", "2", "--warmup-epochs", "1", "--out", str(run_a)]) == 0
    assert main(["train", *FAST, "--epochs", "2", "--fix-init", "10", "--out", str(run_b)]) == 0
    out = tmp_path / "plots"
    assert main(["plot", str(run_a / "checkpoint.pt"), "--compare", str(run_b / "checkpoint.pt"), "--out", str(out)]) == 0
    for name in ("shapes.png", "iou.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pwlu", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--model", "vgg99", "--dataset", "synthetic"], "unknown model 'vgg99'"),
        (["train", "--activation", "softmax", "--dataset", "synthetic"], "unknown activation 'softmax'"),
        (["train", "--dataset", "mnist-typo"], "unknown dataset 'mnist-typo'"),
        (["train", "--dataset", "imagefolder:/no/such/dir"], "/no/such/dir"),
        (["train", "--dataset", "synthetic", "--epochs", "2", "--warmup-epochs", "5"], "--warmup-epochs"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = _run_cli(*args, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written


def test_cli_missing_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("pwlu.app.data.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    out = tmp_path / "out"
    code = main(["train", "--data-dir", str(tmp_path / "missing"), "--out", str(out), "--no-progress"])
    assert code == 2 and not out.exists()


def test_cli_corrupt_checkpoint_overwrites_nothing(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"this is not a checkpoint")
    out = tmp_path / "plots"
    out.mkdir()
    (out / "shapes.png").write_bytes(b"old")
    proc = _run_cli("plot", str(bad), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (out / "shapes.png").read_bytes() == b"old"
    proc = _run_cli("plot", str(tmp_path / "missing.pt"), cwd=tmp_path)
    assert proc.returncode == 2 and "missing.pt" in proc.stderr


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_generated_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28))
    labels = rng.integers(0, 10, (20,))
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    assert (read_idx(tmp_path / "train-images-idx3-ubyte.gz") == images).all()
    data = load_fashion_mnist(str(tmp_path), download=False)
    assert data.train_x.shape == (20, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert torch.equal(data.train_y, torch.from_numpy(labels))
    assert torch.equal(data.test_x[:, 0], torch.from_numpy(images).to(torch.uint8))
