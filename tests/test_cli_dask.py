"""``fastxent score`` at scale: Zarr arrays and ``.npy`` shards as input, and ``--scheduler``
(the chunks scored by the workers of a Dask cluster), run as a subprocess as in
tests/test_cli.py, against the in-memory library.

One ``distributed.LocalCluster`` (2 worker processes) is started for this module and
shut down by it; the command connects to its scheduler's address. About 40 s on 2 cores.
"""

import os

import numpy as np
import pytest

zarr = pytest.importorskip("zarr", reason="zarr is not installed (pip install 'fastxent[dask]')")
distributed = pytest.importorskip("distributed", reason="distributed is not installed (pip install 'fastxent[dask]')")

import fastxent as fx  # noqa: E402
from tests.test_cli import _run_with_terminal_stderr, logits_and_labels, run_cli  # noqa: E402

FIELDS = "loss,lse,target_logprob,entropy,argmax,correct"


@pytest.fixture(scope="module")
def scheduler():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       memory_limit="1GB", silence_logs=40)
    yield cluster.scheduler_address
    cluster.close()


def _zarr(path, array, rows):
    stored = zarr.create_array(store=str(path), shape=array.shape, chunks=(rows,) + array.shape[1:],
                               dtype=array.dtype)
    stored[...] = array
    return path


def _shards(folder, name, array, sizes):
    """``array`` saved as .npy shards of ``sizes`` rows; the quoted glob that finds them."""
    bounds = np.cumsum([0] + list(sizes))
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(folder / f"{name}-{k:03d}.npy", array[lo:hi])
    return str(folder / f"{name}-*.npy")


def _inputs(tmp_path, kind):
    x, y = logits_and_labels()                                  # 300 x 37, every 7th row ignored
    if kind == "zarr":
        return x, y, _zarr(tmp_path / "x.zarr", x, 40), _zarr(tmp_path / "y.zarr", y, 40)
    sizes = (7, 100, 1, 192)                                   # chunks of the plan span shard ends
    return x, y, _shards(tmp_path, "x", x, sizes), _shards(tmp_path, "y", y, sizes)


def _assert_fields_equal_library(path, x, y):
    want = fx.score(x, y, ignore_index=-100)
    with np.load(path) as got:
        assert sorted(got.files) == sorted(FIELDS.split(","))
        for name in FIELDS.split(","):
            expected = getattr(want, name)
            assert got[name].dtype == expected.dtype, name
            np.testing.assert_allclose(got[name], expected, rtol=2e-6, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["zarr", "shards"])
@pytest.mark.parametrize("where", ["here", "cluster"])
def test_score_zarr_and_shards_equal_library(tmp_path, scheduler, kind, where):
    x, y, logits, labels = _inputs(tmp_path, kind)
    cluster = ["--scheduler", scheduler] if where == "cluster" else []
    # 8 KiB: chunks of ~16 rows (Zarr: rounded to its stored chunks of 40 rows, with a warning).
    status, out, err = run_cli("score", logits, labels, "-o", tmp_path / "all.npz", "--fields", FIELDS,
                               "--ignore-index", "-100", "--memory", "8k", *cluster)
    assert status == 0, err
    _assert_fields_equal_library(tmp_path / "all.npz", x, y)
    if kind == "zarr":
        assert "stored chunks of 40 rows" in err
    assert err.strip().splitlines()[-1].startswith("fastxent score: 300 rows x 37 classes")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cluster_mean_loss_equals_library_and_dask_bar_on_a_terminal(tmp_path, scheduler):
    x, y, logits, labels = _inputs(tmp_path, "zarr")
    status, out, err = run_cli("score", logits, labels, "--reduction", "mean", "--ignore-index", "-100",
                               "--scheduler", scheduler)
    assert status == 0, err
    np.testing.assert_allclose(float(out), float(fx.sparse_softmax_cross_entropy(x, y, ignore_index=-100,
                                                                                  reduction="mean")), rtol=2e-6)
    shown = _run_with_terminal_stderr(["score", logits, labels, "-o", tmp_path / "l.npy", "--memory", "16k",
                                       "--ignore-index", "-100", "--scheduler", scheduler])
    assert "% Completed" in shown, shown            # distributed's TextProgressBar, on stderr


@pytest.mark.parametrize("case", ["bad labels", "no shard", "mixed shards", "zarr bfloat16", "no scheduler"])
def test_bad_input_is_one_line(tmp_path, scheduler, case):
    x, y, logits, labels = _inputs(tmp_path, "zarr")
    args, expected = ["score", logits, labels, "-o", tmp_path / "l.npy", "--ignore-index", "-100"], []
    if case == "bad labels":
        y[123] = 37
        args[2] = _zarr(tmp_path / "bad.zarr", y, 40)
        args += ["--scheduler", scheduler]
        expected = ["labels[123] = 37 is outside [0, 37)"]
    elif case == "no shard":
        args[1] = str(tmp_path / "nothing-*.npy")
        expected = ["nothing-*.npy: no .npy file matches"]
    elif case == "mixed shards":
        np.save(tmp_path / "m-0.npy", x[:10])
        np.save(tmp_path / "m-1.npy", x[10:, :5])
        args[1] = str(tmp_path / "m-*.npy")
        expected = ["m-1.npy: a shard of float32 (290, 5)"]
    elif case == "zarr bfloat16":
        args.append("--bfloat16")
        expected = ["--bfloat16 reads the raw items of .npy files, not of a Zarr array"]
    else:
        args += ["--scheduler", "tcp://127.0.0.1:9"]
        expected = ["--scheduler tcp://127.0.0.1:9: cannot reach a Dask scheduler there"]
    status, out, err = run_cli(*args, env_extra={"FASTXENT_SCHEDULER_TIMEOUT": "1"})
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and all(text in err for text in expected), err
    assert not os.path.exists(tmp_path / "l.npy")
