"""The CLI never loses or mixes up a run: overwrites, resumes with another configuration, reuse in
``compare``/``ablate``, a missing ``--data-dir``, an unwritable ``--out``, and bad values.

Every refusal is one line on stderr, exit status 2, and leaves every file as it was.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch

from pwlu.app.cli import main
from pwlu.app.data import DataError, load_fashion_mnist

FAST = ["--dataset", "synthetic", "--batch-size", "64", "--no-progress"]
ONE_EPOCH = [*FAST, "--epochs", "1", "--warmup-epochs", "0"]


def _snapshot(root) -> dict:
    """Every file under ``root`` (or ``root`` itself) with its bytes and modification time."""
    root = os.fspath(root)
    if not os.path.exists(root):
        return {}
    if os.path.isfile(root):
        return {root: (open(root, "rb").read(), os.stat(root).st_mtime_ns)}
    snap = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                snap[os.path.relpath(p, root)] = (f.read(), os.stat(p).st_mtime_ns)
    return snap


def _refused(code: int, capsys, *needles: str) -> str:
    """Assert a one-line ``pwlu: error:`` refusal with exit status 2 that contains every needle."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("pwlu: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """A finished one-epoch run and an unfinished (killed after epoch 1 of 2) run, built once."""
    base = tmp_path_factory.mktemp("runs")
    assert main(["train", *ONE_EPOCH, "--out", str(base / "finished")]) == 0
    assert main(["train", *FAST, "--epochs", "2", "--warmup-epochs", "1", "--stop-after", "1",
                 "--out", str(base / "unfinished")]) == 0  # fmt: skip
    return base


def _copy(run_dirs, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(run_dirs / name, dst)
    return dst


# 1. train --out over an existing run -----------------------------------------------------------


def test_train_over_an_existing_run_needs_overwrite(run_dirs, tmp_path, capsys):
    for name in ("finished", "unfinished"):
        out = _copy(run_dirs, name, tmp_path)
        before = _snapshot(out)
        code = main(["train", *ONE_EPOCH, "--seed", "7", "--out", str(out)])
        _refused(code, capsys, str(out), "--overwrite", "--resume")
        assert _snapshot(out) == before
    # --overwrite replaces it
    out = tmp_path / "finished"
    assert main(["train", *ONE_EPOCH, "--seed", "7", "--out", str(out), "--overwrite"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["config"]["seed"] == 7
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["seed"] == 7
    capsys.readouterr()
    # --resume and --overwrite together make no sense
    before = _snapshot(out)
    _refused(main(["train", *ONE_EPOCH, "--seed", "7", "--out", str(out), "--overwrite", "--resume"]), capsys,
             "--resume", "--overwrite")  # fmt: skip
    assert _snapshot(out) == before


def test_overwrite_leaves_nothing_of_the_old_run(run_dirs, tmp_path, capsys, monkeypatch):
    """Regression: ``train --overwrite`` kept the old run's files until the new run wrote its
    own. The old ``model.pt`` exported from it and its plots stayed beside the new checkpoint as
    if made from it, and a new run killed before its first epoch ended left the old checkpoint
    and metrics in place, so that ``--resume`` continued the old run. ``--overwrite`` now removes
    them (and says so) once every check has passed."""
    import pwlu.app.train as train_mod

    out = _copy(run_dirs, "finished", tmp_path)
    assert main(["export", str(out / "checkpoint.pt"), "--format", "torchscript"]) == 0
    for name in ("shapes.png", "iou.png"):
        (out / name).write_bytes(b"old plot")
    (out / "notes.txt").write_text("the user's own file")
    capsys.readouterr()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "evaluate", killed)  # killed at the end of the first epoch
    assert main(["train", *ONE_EPOCH, "--seed", "7", "--out", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err
    left = sorted(p.name for p in out.iterdir())
    assert left == ["notes.txt"], left
    for name in ("checkpoint.pt", "metrics.json", "model.pt", "shapes.png", "iou.png"):
        assert name in err, err
    monkeypatch.undo()
    # nothing to resume: the old run is gone, and a refused --overwrite removes nothing
    assert main(["train", *ONE_EPOCH, "--seed", "7", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 7
    capsys.readouterr()
    before = _snapshot(out)
    _refused(main(["train", *ONE_EPOCH, "--seed", "7", "--lr", "-1", "--out", str(out), "--overwrite"]), capsys, "--lr")
    assert _snapshot(out) == before
    # fine-tuning from the run's own checkpoint with --overwrite would delete the source: refused
    # (review: it deleted it right after loading, so a kill before the first epoch left nothing)
    ckpt = str(out / "checkpoint.pt")
    _refused(main(["train", *ONE_EPOCH, "--init-from", ckpt, "--out", str(out), "--overwrite"]), capsys, ckpt)
    assert _snapshot(out) == before


# 2. --resume with another configuration ---------------------------------------------------------


@pytest.mark.parametrize(
    "extra,option",
    [
        (["--lr", "0.05"], "--lr"),
        (["--seed", "3"], "--seed"),
        (["--activation", "relu"], "--activation"),
        (["--model", "resnet"], "--model"),
        (["--epochs", "3"], "--epochs"),
        (["--batch-size", "32"], "--batch-size"),
        (["--intervals", "8", "--mode", "layer"], "--intervals"),
        (["--train-subset", "100"], "--train-subset"),
    ],
)
def test_resume_with_another_configuration_is_refused(run_dirs, tmp_path, capsys, extra, option):
    out = _copy(run_dirs, "unfinished", tmp_path)
    before = _snapshot(out)
    args = ["train", *FAST, "--epochs", "2", "--warmup-epochs", "1", *extra, "--out", str(out), "--resume"]
    line = _refused(main(args), capsys, option, "resume")
    if extra[0] == "--intervals":
        assert "--mode" in line  # every differing option is named
    assert _snapshot(out) == before


def test_resume_may_change_where_and_how_it_runs(run_dirs, tmp_path, capsys):
    """out (a moved run), data_dir, progress and stop_after may differ on resume."""
    out = _copy(run_dirs, "unfinished", tmp_path / "moved")
    args = ["train", "--dataset", "synthetic", "--batch-size", "64", "--epochs", "2", "--warmup-epochs", "1",
            "--data-dir", str(tmp_path), "--out", str(out), "--resume"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["config"]["out"] == str(out)


# 3. compare / ablate reuse only runs with the same configuration --------------------------------


def test_compare_reuses_only_runs_with_the_same_configuration(tmp_path, capsys):
    out = tmp_path / "cmp"
    grid = ["compare", *ONE_EPOCH, "--models", "cnn", "--activations", "relu", "--seeds", "0", "--out", str(out)]
    assert main(grid) == 0
    run = out / "runs" / "cnn_relu_s0"
    first = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    # the same grid with another lr: refused, nothing touched (the old table is kept)
    before = _snapshot(out)
    line = _refused(main([*grid, "--lr", "0.001"]), capsys, str(run), "--lr", "--overwrite")
    assert "0.1" in line and "0.001" in line
    assert _snapshot(out) == before
    # --overwrite retrains it, and says so
    assert main([*grid, "--lr", "0.001", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "retraining" in err and str(run) in err
    second = json.loads((run / "metrics.json").read_text())
    assert second["config"]["lr"] == 0.001 and second["history"] != first["history"]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["config"]["lr"] == 0.001
    rows = (out / "runs.csv").read_text().strip().splitlines()
    assert rows[1].endswith(str(second["final_test_acc"]))
    # the same configuration again is reused (not retrained), whatever --no-progress says
    before = _snapshot(run)
    assert main([a for a in grid if a != "--no-progress"] + ["--lr", "0.001"]) == 0
    assert "reusing" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_ablate_reuses_only_runs_with_the_same_configuration(tmp_path, capsys):
    out = tmp_path / "abl"
    grid = ["ablate", *ONE_EPOCH, "--variants", "N=4", "--seeds", "0", "--out", str(out)]
    assert main(grid) == 0
    capsys.readouterr()
    before = _snapshot(out)
    _refused(main([*grid, "--batch-size", "32"]), capsys, "--batch-size", "--overwrite")
    assert _snapshot(out) == before


# 4. --data-dir that does not exist --------------------------------------------------------------


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def other_fashion_copy(tmp_path, monkeypatch):
    """A (tiny) Fashion-MNIST copy where Debian's package puts it: the copy a fallback would use."""
    debian = tmp_path / "debian-fashion-mnist"
    debian.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(debian / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (32, 28, 28)))
        _write_idx(debian / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (32,)))
    monkeypatch.setattr("pwlu.app.data.DEBIAN_FASHION_MNIST", debian)
    return debian


def test_missing_data_dir_is_an_error_not_a_fallback(tmp_path, capsys, other_fashion_copy):
    missing, out = tmp_path / "nonexistent", tmp_path / "out"
    code = main(["train", "--data-dir", str(missing), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16",
                 "--no-progress", "--out", str(out)])  # fmt: skip
    _refused(code, capsys, str(missing))
    assert not out.exists() and not missing.exists()
    # an existing --data-dir without the files is not replaced by another copy either
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        load_fashion_mnist(str(empty), download=False)
    # without --data-dir the other copy is used, as documented
    assert len(load_fashion_mnist(None, download=False).train_y) == 32


# 5. an unwritable --out is found before training ------------------------------------------------


@pytest.mark.parametrize("command", ["train", "compare", "plot"])
@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_unwritable_out_is_refused_before_training(run_dirs, tmp_path, capsys, monkeypatch, command, where):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a directory")
    out = blocker / "run" if where == "under-a-file" else blocker
    built = []  # no model is built (for training, or for plotting) before the check
    import pwlu.app.train as train_module

    real_build = train_module.build
    monkeypatch.setattr(train_module, "build", lambda *a, **k: built.append(1) or real_build(*a, **k))
    args = {
        "train": ["train", *ONE_EPOCH],
        "compare": ["compare", *ONE_EPOCH, "--models", "cnn", "--activations", "relu", "--seeds", "0"],
        "plot": ["plot", str(run_dirs / "finished" / "checkpoint.pt"), "--batches", "1"],
    }[command]
    _refused(main([*args, "--out", str(out)]), capsys, str(blocker))
    assert blocker.read_text() == "not a directory" and not built


def test_read_only_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """A directory the user may not write to (simulated: tests run as root, where chmod does not stop writes)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    prefix = os.path.realpath(locked)
    real_access = os.access

    def access(path, mode, *a, **k):
        if os.path.realpath(path).startswith(prefix) and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    for out in (locked, locked / "run"):
        _refused(main(["train", *ONE_EPOCH, "--out", str(out)]), capsys, str(locked), "not writable")
        assert os.listdir(locked) == []


# 6. plot on a mismatched checkpoint, and bad numbers --------------------------------------------


def test_plot_checkpoint_whose_config_does_not_match_its_weights(run_dirs, tmp_path, capsys):
    ckpt = torch.load(run_dirs / "finished" / "checkpoint.pt", weights_only=False)
    ckpt["config"]["intervals"] = 8  # the weights have 16 intervals
    bad = tmp_path / "checkpoint.pt"
    torch.save(ckpt, bad)
    out = tmp_path / "plots"
    _refused(main(["plot", str(bad), "--out", str(out), "--batches", "1"]), capsys, str(bad), "does not match")
    assert not out.exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--lr", "inf"], "--lr"),
        (["train", "--lr", "-0.1"], "--lr"),
        (["train", "--train-subset", "0"], "--train-subset"),
        (["train", "--train-subset", "-5"], "--train-subset"),
        (["train", "--test-subset", "0"], "--test-subset"),
        (["train", "--weight-decay", "-0.0001"], "--weight-decay"),
        (["train", "--weight-decay", "nan"], "--weight-decay"),
        (["train", "--warmup-epochs", "nan"], "--warmup-epochs"),
        (["train", "--fix-init", "nan"], "--fix-init"),
        (["train", "--fix-init", "inf"], "--fix-init"),
        (["train", "--rebound-every", "0"], "--rebound-every"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["compare", "--lr", "nan", "--models", "cnn", "--activations", "relu", "--seeds", "0"], "--lr"),
        (["plot", "CKPT", "--batches", "0"], "--batches"),
        (["plot", "CKPT", "--batches", "-1"], "--batches"),
        (["export", "CKPT", "--format", "torchscript", "--image-size", "0"], "--image-size"),
        (["export", "CKPT", "--format", "torchscript", "--image-size", "-3"], "--image-size"),
    ],
)
def test_bad_values_are_one_line_errors(run_dirs, tmp_path, capsys, args, needle):
    ckpt = run_dirs / "finished" / "checkpoint.pt"
    before = _snapshot(run_dirs / "finished")
    args = [str(ckpt) if a == "CKPT" else a for a in args]
    if args[0] in ("train", "compare"):
        args = [args[0], "--dataset", "synthetic", "--no-progress", "--epochs", "2", "--warmup-epochs", "1", *args[1:]]
    out = tmp_path / ("model.pt" if args[0] == "export" else "out")
    value = args[len(args) - args[::-1].index(needle)]  # the value after the last occurrence
    _refused(main([*args, "--out", str(out)]), capsys, needle, value)
    assert not out.exists() and _snapshot(run_dirs / "finished") == before


def test_export_never_overwrites_silently(run_dirs, tmp_path, capsys):
    """Regression: ``pwlu export --out`` replaced any existing file without a word, the run's own
    checkpoint included (an unfinished run could then not be resumed). An existing file is
    refused unless ``--overwrite``; the checkpoint itself always."""
    run = _copy(run_dirs, "unfinished", tmp_path)
    ckpt = run / "checkpoint.pt"
    before = _snapshot(run)
    _refused(
        main(["export", str(ckpt), "--format", "torchscript", "--out", str(ckpt)]), capsys, str(ckpt), "checkpoint"
    )
    _refused(
        main(["export", str(ckpt), "--format", "torchscript", "--out", str(ckpt), "--overwrite"]),
        capsys, "is the checkpoint being exported",
    )  # fmt: skip
    other = tmp_path / "other.pt"
    other.write_bytes(b"someone else's file")
    _refused(
        main(["export", str(ckpt), "--format", "torchscript", "--out", str(other)]), capsys, str(other), "--overwrite"
    )
    assert other.read_bytes() == b"someone else's file" and _snapshot(run) == before
    # the default file next to the checkpoint, once written, is not replaced either
    assert main(["export", str(ckpt), "--format", "torchscript"]) == 0
    capsys.readouterr()
    default = run / "model.pt"
    written = _snapshot(default)
    _refused(main(["export", str(ckpt), "--format", "torchscript"]), capsys, str(default), "already exists")
    assert _snapshot(default) == written
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(other), "--overwrite"]) == 0
    assert other.read_bytes() != b"someone else's file"
    capsys.readouterr()
    assert main(["train", *FAST, "--epochs", "2", "--warmup-epochs", "1", "--out", str(run), "--resume"]) == 0


def test_fine_tune_resumes_from_another_working_directory(run_dirs, tmp_path, capsys, monkeypatch):
    """Regression: a fine-tuning run started with a relative ``--init-from`` recorded that path
    as given, so that resuming from another working directory failed (the file "does not
    exist") and the absolute path of the same file was refused as another option. The path is
    recorded absolute."""
    source = _copy(run_dirs, "finished", tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["train", *FAST, "--epochs", "2", "--warmup-epochs", "0", "--out", str(tmp_path / "tuned")]
    assert main([*args, "--init-from", "finished/checkpoint.pt", "--stop-after", "1"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main([*args, "--init-from", str(source / "checkpoint.pt"), "--resume"]) == 0, capsys.readouterr().err
    assert main([*args, "--init-from", "../finished/checkpoint.pt", "--resume"]) == 0, capsys.readouterr().err


def test_fine_tune_resumes_after_its_source_is_gone(tmp_path, capsys):
    """Regression: a fine-tuning run rebuilt its converted structure from the ``--init-from``
    checkpoint also when resuming (whose own checkpoint then replaces every weight), so it could not
    resume once that file was moved or deleted. The run's checkpoint now records the source's
    configuration, and a resume rebuilds the structure from it when the file is gone."""
    source = tmp_path / "gelu"
    assert main(["train", *ONE_EPOCH, "--model", "cnn", "--activation", "gelu", "--out", str(source)]) == 0
    args = ["train", *FAST, "--model", "cnn", "--activation", "pwlu", "--init", "match", "--epochs", "2",
            "--warmup-epochs", "0", "--init-from", str(source / "checkpoint.pt")]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "tuned"), "--stop-after", "1"]) == 0
    (source / "checkpoint.pt").rename(tmp_path / "moved.pt")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "tuned"), "--resume"]) == 0, capsys.readouterr().err
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert resumed["finished"] and resumed["final_test_acc"] == whole["final_test_acc"]
    # a new fine-tuning run from the missing file is still refused, naming it
    code = main([*args, "--out", str(tmp_path / "new")])
    _refused(code, capsys, str(source / "checkpoint.pt"))


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["compare", "--models", "cnn", "--activations", "relu", "--seeds", "0", "0"],
            "--seeds names 0 more than once",
        ),
        (["compare", "--models", "cnn", "--activations", "relu", "relu", "--seeds", "0"], "--activations names relu"),
        (["compare", "--models", "cnn", "cnn", "--activations", "relu", "--seeds", "0"], "--models names cnn"),
        (["ablate", "--variants", "N=4", "N=4", "--seeds", "0"], "--variants names N=4"),
        (["ablate", "--variants", "N=4", "--seeds", "1", "1"], "--seeds names 1"),
    ],
)
def test_grid_options_naming_a_value_twice_are_refused(tmp_path, capsys, args, needle):
    """Regression: ``compare --seeds 0 0`` trained cnn_relu_s0, then stopped on the second copy
    with "already holds a finished run; pass --resume" (an option compare does not have), and
    wrote no table. A repeated value is refused before anything runs."""
    out = tmp_path / "grid"
    _refused(
        main([args[0], *FAST, "--epochs", "1", "--warmup-epochs", "0", *args[1:], "--out", str(out)]), capsys, needle
    )
    assert not out.exists()
