"""``fastxent score --hidden H.npy --weight W.npy LABELS.npy`` and ``fastxent bench --linear``, as subprocesses.

The scores of hidden states equal the library's ``fastxent.linear_score`` /
``linear_cross_entropy`` (itself held to the float64 reference in test_linear.py),
streamed in chunks under a budget of a few KiB; bad combinations of options are one
line and exit status 2; ``bench --linear --quick`` runs every entry and agrees.
"""

import json
import re

import numpy as np
import pytest

import fastxent as fx
from tests.test_cli import run_cli


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((150, 12)).astype(np.float32)
    weight = (rng.standard_normal((90, 12)) / 2).astype(np.float32)
    bias = rng.standard_normal(90).astype(np.float32)
    labels = rng.integers(0, 90, 150)
    labels[::9] = -100
    for name, array in (("h", hidden), ("w", weight), ("b", bias), ("y", labels)):
        np.save(tmp_path / f"{name}.npy", array)
    return tmp_path, hidden, weight, bias, labels


def test_fields_equal_the_library(files):
    tmp_path, hidden, weight, bias, labels = files
    status, _, err = run_cli("score", "--hidden", tmp_path / "h.npy", "--weight", tmp_path / "w.npy", "--bias",
                             tmp_path / "b.npy", tmp_path / "y.npy", "--ignore-index", "-100", "--fields",
                             "loss,entropy,argmax,correct", "-o", tmp_path / "out.npz", "--memory", "8k")
    assert status == 0, err
    assert "fastxent score: 150 rows x 90 classes" in err
    assert int(re.search(r"chunks of (\d+) rows", err).group(1)) < 50, err  # several chunks
    got = np.load(tmp_path / "out.npz")
    want = fx.linear_score(hidden, weight, labels, bias, ignore_index=-100)
    for name in ("loss", "entropy", "argmax", "correct"):
        np.testing.assert_allclose(got[name], getattr(want, name), rtol=1e-6, atol=1e-6, err_msg=name)


def test_loss_alone_and_mean(files):
    tmp_path, hidden, weight, _, labels = files
    status, out, err = run_cli("score", "--hidden", tmp_path / "h.npy", "--weight", tmp_path / "w.npy",
                               tmp_path / "y.npy", "--ignore-index", "-100", "--reduction", "mean", "--memory", "8k")
    assert status == 0, err
    want = float(fx.linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean"))
    assert float(out.strip()) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (("--hidden", "h.npy", "y.npy"), "--hidden H.npy takes --weight W.npy"),
    (("--hidden", "h.npy", "--weight", "w.npy", "h.npy", "y.npy"), "not LOGITS.npy"),
    (("--weight", "w.npy", "h.npy", "y.npy"), "--weight and --bias go with --hidden"),
    (("--hidden", "h.npy", "--weight", "b.npy", "y.npy"), "b.npy: the weight must be (V, 12)"),
    (("--hidden", "h.npy", "--weight", "w.npy", "--bias", "w.npy", "y.npy"), "w.npy: the bias must be (90,)"),
    (("--hidden", "h.npy", "--weight", "w.npy", "--axis", "0", "y.npy"), "--axis 0: hidden states"),
    (("--hidden", "h.npy", "--weight", "w.npy", "b.npy"), "labels must be integer class ids"),
])
def test_bad_combinations_are_one_line(files, args, message):
    tmp_path = files[0]
    args = [tmp_path / a if a.endswith(".npy") else a for a in args]
    status, _, err = run_cli("score", *args, "--reduction", "mean")
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_bench_linear_quick(tmp_path):
    status, out, err = run_cli("bench", "--linear", "--quick", "--json", tmp_path / "linear.json")
    assert status == 0, err
    assert "N=128 H=32 V=1000" in out and "| fastxent fwd+bwd |" in out and "✗" not in out
    results = json.loads((tmp_path / "linear.json").read_text())["linear"]["128x32x1000"]
    assert {"fastxent fwd", "fastxent fwd+bwd", "matmul G.T@h"} <= set(results)
    assert all(entry["problem"] is None for entry in results.values())
    status, _, err = run_cli("bench", "--linear", "1000x10")
    assert status == 2 and "is not NxHxV" in err
