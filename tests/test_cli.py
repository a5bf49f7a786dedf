"""The ``fastxent`` command, run as a subprocess: ``bench --quick`` and ``score``.

Every case runs ``python -m fastxent.cli`` in a child process (the console
script ``fastxent`` is the same ``main``), so exit statuses, stderr and peak
memory are the command's own. Kept under a minute on 2 cores: small arrays,
``--memory`` budgets of a few MB.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastxent as fx
from tests.support import assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def run_cli(*args, cwd=None, env_extra=None, timeout=300):
    """Run the command; return (exit status, stdout, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FASTXENT_BACKEND", None)
    env.update(env_extra or {})
    child = subprocess.Popen([sys.executable, "-m", "fastxent.cli", *map(str, args)], cwd=cwd or REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        raise
    return child.returncode, out.decode(), err.decode()


#: Runs the command and writes its own peak resident set (VmHWM, KiB) as the last line of
#: stderr. Not ru_maxrss (getrusage, wait4): Linux carries the parent's peak into a forked
#: child's, so under a pytest process of 200 MB every child "peaked" at 200 MB and the
#: budget test could not fail. VmHWM belongs to the memory map exec gives the child.
_PEAK_REPORTER = """
import atexit, runpy, sys

def report():
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:"))
    sys.stderr.write("\\nVmHWM " + peak.split()[1] + "\\n")

atexit.register(report)
sys.argv[0] = "fastxent"
runpy.run_module("fastxent.cli", run_name="__main__")
"""


def run_for_rss(*args):
    """Run the command; return (exit status, stderr, the child's own peak RSS in bytes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FASTXENT_BACKEND", None)
    child = subprocess.run([sys.executable, "-c", _PEAK_REPORTER, *map(str, args)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    err = child.stderr.decode()
    lines = err.rstrip().splitlines()
    assert lines and lines[-1].startswith("VmHWM "), err[-2000:]
    return child.returncode, "\n".join(lines[:-1]), int(lines[-1].split()[1]) * 1024


def without(tmp_path, module):
    """A PYTHONPATH on which importing ``module`` fails, as if it were not installed."""
    fake = tmp_path / "fake" / module
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ImportError('{module} is not installed')\n")
    return f"{tmp_path / 'fake'}{os.pathsep}{REPO}"


def logits_and_labels(shape=(300, 37), seed=0, ignore_every=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3
    x[rng.random(shape) < 0.02] *= 8  # spiky, so the softmax is not flat
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    if ignore_every:
        labels.reshape(-1)[::ignore_every] = -100
    return x.astype(np.float32), labels


# ----------------------------------------------------------------------------
# fastxent bench
# ----------------------------------------------------------------------------

def test_bench_quick_table_agrees_and_json_parses(tmp_path):
    # Peers limited to numpy and torch: importing TensorFlow and JAX alone takes
    # longer than the rest of this test on 2 cores.
    report = tmp_path / "bench.json"
    status, out, err = run_cli("bench", "--quick", "--peers", "numpy,torch", "--json", report)
    assert status == 0, err
    assert "Traceback" not in err
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:7] == ["op", "shape", "dtype", "entry", "median", "GB/s", "x read"]
    assert header[-1] == "ref"
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    assert body, out
    entries = {row[3] for row in body}
    assert "fastxent[numba]" in entries and "read" in entries
    for row in body:
        assert row[-1] == ("—" if row[3] == "read" else "✓"), row
    assert "warm-up" in out  # the compile-excluded note

    data = json.loads(report.read_text())
    assert len(data["rows"]) == len(body)
    assert all(row["agrees"] is (None if row["kind"] == "yardstick" else True) for row in data["rows"])
    assert all(row["median_s"] > 0 and row["gb_per_s"] > 0 for row in data["rows"])
    assert data["machine"]["cores"] >= 1


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "plot.png"
    status, out, err = run_cli("bench", "--quick", "--ops", "sparse_fwd", "--peers", "numpy",
                               "--backend", "numba", "--plot", picture)
    assert status == 0, err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_is_a_clear_error(tmp_path):
    status, out, err = run_cli("bench", "--quick", "--plot", tmp_path / "p.png",
                               env_extra={"PYTHONPATH": without(tmp_path, "matplotlib")})
    assert status == 2
    assert err.strip().splitlines() == ["fastxent bench: error: --plot needs matplotlib: "
                                        "pip install 'fastxent[plot]'"]
    assert not (tmp_path / "p.png").exists()


def test_bench_without_ml_dtypes_skips_bfloat16(tmp_path):
    """The README's first command installs numpy and numba only: no ml_dtypes, so
    the built-in bfloat16 cases are skipped with the reason, not an error."""
    env = {"PYTHONPATH": without(tmp_path, "ml_dtypes")}
    status, out, err = run_cli("bench", "--quick", "--peers", "none", env_extra=env)
    assert status == 0, err
    assert "bfloat16" not in "".join(line for line in out.splitlines() if line.startswith("| "))
    assert "bfloat16 needs ml_dtypes" in out
    status, out, err = run_cli("bench", "--dtypes", "bfloat16", env_extra=env)
    assert status == 2 and "--dtypes bfloat16 needs ml_dtypes" in err


@pytest.mark.parametrize("args, message", [
    (["--shapes", "12"], "--shapes: '12' is not ROWSxCLASSES"),
    (["--ops", "nope"], "--ops: 'nope' is not one of"),
    (["--dtypes", "int8"], "--dtypes: 'int8' is not one of"),
    (["--backend", "cupy"], "--backend 'cupy' is not available here"),
    (["--repeat", "0"], "argument --repeat: 0 is not at least 1"),
    (["--peers", "pytorch"], "--peers: 'pytorch' is not one of jax, numpy"),
])
def test_bench_bad_options(args, message):
    if args == ["--backend", "cupy"] and "cupy" in fx.available_backends():
        pytest.skip("cupy is available here")
    status, out, err = run_cli("bench", *args)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_no_command_prints_help_and_version():
    status, out, err = run_cli()
    assert status == 2 and "bench" in err and "score" in err
    status, out, err = run_cli("--version")
    assert status == 0 and out.strip() == f"fastxent {fx.__version__}"


def test_every_package_ships():
    """pyproject.toml lists its packages by hand: every folder of fastxent/ with an
    __init__.py (the command line is a package of packages) must be among them."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        listed = set(tomllib.load(handle)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(folder, REPO).replace(os.sep, ".")
             for folder, _, files in os.walk(os.path.join(REPO, "fastxent")) if "__init__.py" in files}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"


# ----------------------------------------------------------------------------
# fastxent score: results equal the library call
# ----------------------------------------------------------------------------

def test_score_loss_equals_library(tmp_path):
    x, y = logits_and_labels()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    # 2 KiB: chunks of 12 rows, so the 300 rows take 25 library calls.
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "-o", tmp_path / "loss.npy",
                               "--ignore-index", "-100", "--memory", "2k")
    assert status == 0, err
    got = np.load(tmp_path / "loss.npy")
    want = fx.sparse_softmax_cross_entropy(x, y, ignore_index=-100)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("fastxent score: 300 rows x 37 classes") and "rows/s" in summary
    assert f"mean loss {float(fx.sparse_softmax_cross_entropy(x, y, ignore_index=-100, reduction='mean')):.6g}" \
        in summary
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("layout", ["rows", "class axis 1"])
def test_score_big_endian_files_equal_library(tmp_path, layout):
    """Files written with the other byte order (``>f4`` scores, ``>i8`` labels: what np.load
    returns for a .npy written on a big-endian machine) score as their native values, every
    field, chunk by chunk (small chunks, a byte-swapped copy of each)."""
    x, y = logits_and_labels()
    axis = -1
    if layout != "rows":   # (60, 37, 5): classes on axis 1, copied into rows as well
        x, y, axis = np.ascontiguousarray(x.reshape(60, 5, 37).transpose(0, 2, 1)), y.reshape(60, 5), 1
    np.save(tmp_path / "x.npy", x.astype(">f4"))
    np.save(tmp_path / "y.npy", y.astype(">i8"))
    assert np.load(tmp_path / "x.npy", mmap_mode="r").dtype.str == ">f4"
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "-o", tmp_path / "all.npz",
                               "--fields", "loss,lse,target_logprob,entropy,argmax,correct", "--axis", axis,
                               "--ignore-index", "-100", "--memory", "4k")
    assert status == 0, err
    assert "Traceback" not in err
    want = fx.score(x, y, axis=axis, ignore_index=-100)
    with np.load(tmp_path / "all.npz") as got:
        for field in want._fields:
            assert got[field].dtype == getattr(want, field).dtype and got[field].dtype.isnative, field
            np.testing.assert_array_equal(got[field], getattr(want, field), err_msg=field)
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "--reduction", "mean",
                               "--axis", axis, "--ignore-index", "-100")
    assert status == 0, err
    assert float(out) == pytest.approx(float(fx.sparse_softmax_cross_entropy(
        x, y, axis=axis, ignore_index=-100, reduction="mean")), rel=1e-6)


def _run_with_terminal_stderr(args, pythonpath=REPO):
    """Run the command with stderr on a pseudo-terminal (100 columns); return what it wrote there."""
    import fcntl
    import struct
    import termios

    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    child = subprocess.Popen([sys.executable, "-m", "fastxent.cli", *map(str, args)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    assert child.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("bar", ["tqdm", "plain"])
def test_score_progress_on_a_terminal_only(tmp_path, bar):
    pythonpath = REPO
    if bar == "tqdm":
        pytest.importorskip("tqdm")
    else:  # tqdm is optional: without it, a plain line rewritten in place
        pythonpath = without(tmp_path, "tqdm")
    x, y = logits_and_labels(shape=(3000, 64), ignore_every=0)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    args = ["score", tmp_path / "x.npy", tmp_path / "y.npy", "-o", tmp_path / "l.npy", "--memory", "32k"]
    status, out, err = run_cli(*args)  # piped: the summary line and nothing else
    assert status == 0 and len(err.strip().splitlines()) == 1 and "\r" not in err, err
    shown = _run_with_terminal_stderr(args, pythonpath)
    assert "\r" in shown and ("row/s" if bar == "tqdm" else "rows/s, ETA") in shown, shown
    assert shown.rstrip().splitlines()[-1].startswith("fastxent score: 3,000 rows")


@pytest.mark.parametrize("bar", ["tqdm", "plain"])
def test_bench_progress_on_a_terminal(tmp_path, bar):
    """On a terminal a bar shows the entries done (it crashed there: the entry's name was
    passed as the count); _run_with_terminal_stderr checks the exit status."""
    if bar == "tqdm":
        pytest.importorskip("tqdm")
    pythonpath = REPO if bar == "tqdm" else without(tmp_path, "tqdm")
    shown = _run_with_terminal_stderr(["bench", "--quick", "--ops", "sparse_fwd", "--shapes", "64x100",
                                       "--backend", "numba", "--peers", "none"], pythonpath)
    assert "\r" in shown and "Traceback" not in shown, shown
    if bar == "plain":  # tqdm may skip redraws within its own interval
        assert "fastxent[numba]" in shown, shown


def test_score_every_field_equals_library(tmp_path):
    x, y = logits_and_labels()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    fields = "loss,lse,target_logprob,entropy,argmax,correct"
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "-o", tmp_path / "all.npz",
                               "--fields", fields, "--ignore-index", "-100", "--memory", "3k")
    assert status == 0, err
    want = fx.score(x, y, ignore_index=-100)
    with np.load(tmp_path / "all.npz") as got:
        assert sorted(got.files) == sorted(fields.split(","))
        for name in fields.split(","):
            expected = getattr(want, name)
            assert got[name].dtype == expected.dtype, name
            if expected.dtype.kind == "f":
                # within rounding: the command line reads memory maps, whose read-only
                # arrays are their own compiled kernel variant (1 ulp of a float32 loss seen)
                assert_close(got[name], expected, x.dtype, "value", name)
            else:
                np.testing.assert_array_equal(got[name], expected, err_msg=name)
    assert "accuracy" in err
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_score_reductions_equal_library(tmp_path, reduction):
    x, y = logits_and_labels()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    fields = ["loss", "lse", "target_logprob", "entropy", "correct"]
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "-o", tmp_path / "r.npz",
                               "--fields", ",".join(fields), "--ignore-index", "-100",
                               "--reduction", reduction, "--memory", "2k")
    assert status == 0, err
    s = fx.score(x, y, ignore_index=-100)
    kept = y != -100
    reduce = np.sum if reduction == "sum" else np.mean
    want = {
        "loss": float(fx.sparse_softmax_cross_entropy(x, y, ignore_index=-100, reduction=reduction)),
        "lse": reduce(s.lse.astype(np.float64)),
        "target_logprob": reduce(s.target_logprob[kept].astype(np.float64)),
        "entropy": reduce(s.entropy.astype(np.float64)),
        "correct": reduce(s.correct[kept].astype(np.float64)),
    }
    printed = dict(line.split() for line in out.strip().splitlines())
    with np.load(tmp_path / "r.npz") as written:
        for name in fields:
            assert float(printed[name]) == float(written[name]), name
            np.testing.assert_allclose(float(written[name]), want[name], rtol=2e-6, err_msg=name)


def test_score_single_reduced_value_prints_a_number(tmp_path):
    x, y = logits_and_labels(ignore_every=0)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "--reduction", "mean")
    assert status == 0, err
    np.testing.assert_allclose(float(out), fx.sparse_softmax_cross_entropy(x, y, reduction="mean"), rtol=2e-6)


@pytest.mark.parametrize("layout", ["rows-time-classes", "rows-classes-time"])
def test_score_more_dims_and_axis(tmp_path, layout):
    x, y = logits_and_labels(shape=(40, 6, 11), ignore_every=0)
    axis = -1
    if layout == "rows-classes-time":  # PyTorch's (N, C, d1) layout
        x, axis = np.ascontiguousarray(np.moveaxis(x, -1, 1)), 1
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "-o", tmp_path / "l.npy",
                               "--axis", axis, "--memory", "4k")
    assert status == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), fx.sparse_softmax_cross_entropy(x, y, axis=axis))


def test_score_bfloat16_raw_items(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x, y = logits_and_labels(ignore_every=0)
    xb = x.astype(ml_dtypes.bfloat16)
    np.save(tmp_path / "x.npy", xb)  # written as '|V2'
    np.save(tmp_path / "y.npy", y)
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "-o", tmp_path / "l.npy")
    assert status == 2 and "--bfloat16" in err
    status, out, err = run_cli("score", tmp_path / "x.npy", tmp_path / "y.npy", "-o", tmp_path / "l.npy",
                               "--bfloat16", "--memory", "2k")
    assert status == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), fx.sparse_softmax_cross_entropy(xb, y))


# ----------------------------------------------------------------------------
# fastxent score: memory stays within the budget
# ----------------------------------------------------------------------------

#: Allowed above (baseline + budget): page fault-around past the chunk end
#: (64 KiB per mapping), allocator slack, the labels and result arrays of a chunk.
RSS_MARGIN = 4 * MiB


@pytest.mark.parametrize("order", ["<f4", ">f4"])
def test_score_peak_rss_within_budget(tmp_path, order):
    """32 MiB of logits under --memory 8M: the peak stays near baseline + 8 MiB.

    The baseline is the same command on a 4-row file with the same number of
    classes (so the same kernels): Python, numpy, numba and the compiled code,
    about 160 MiB here. Without the page release the big run peaks 32 MiB above
    it (measured: +31.2 MiB; with it +7.5 MiB). A big-endian file: each chunk is
    also copied to the native byte order, which the chunk size accounts for.
    """
    classes, budget = 8192, 8 * MiB
    rng = np.random.default_rng(0)
    for name, rows in (("tiny", 4), ("big", 1024)):  # big: 1024 x 8192 float32 = 32 MiB = 4x budget
        x = np.lib.format.open_memmap(tmp_path / f"{name}_x.npy", "w+", np.dtype(order), (rows, classes))
        for start in range(0, rows, 128):
            x[start:start + 128] = rng.standard_normal((min(128, rows - start), classes), dtype=np.float32)
        x.flush()
        del x
        np.save(tmp_path / f"{name}_y.npy", rng.integers(0, classes, rows))
    assert os.path.getsize(tmp_path / "big_x.npy") >= 4 * budget

    peaks = {}
    for name in ("tiny", "big"):
        status, err, peaks[name] = run_for_rss("score", tmp_path / f"{name}_x.npy", tmp_path / f"{name}_y.npy",
                                               "-o", tmp_path / f"{name}_loss.npy", "--memory", "8M")
        assert status == 0, err
    allowed = peaks["tiny"] + budget + RSS_MARGIN
    assert peaks["big"] <= allowed, (
        f"peak RSS {peaks['big'] / MiB:.1f} MiB > baseline {peaks['tiny'] / MiB:.1f} MiB + "
        f"budget 8 MiB + margin {RSS_MARGIN / MiB:.0f} MiB")
    x = np.load(tmp_path / "big_x.npy")
    y = np.load(tmp_path / "big_y.npy")
    assert x.dtype.str == order
    np.testing.assert_array_equal(np.load(tmp_path / "big_loss.npy"), fx.sparse_softmax_cross_entropy(x, y))


# ----------------------------------------------------------------------------
# fastxent score: bad input -> one line, exit 2, no traceback, no output
# ----------------------------------------------------------------------------

def _write_bad_case(case, d):
    """Write the inputs of bad-input ``case`` into ``d``; return (args, words the message must hold)."""
    x, y = logits_and_labels(shape=(50, 5), ignore_every=0)
    xp, yp, out = d / "x.npy", d / "y.npy", d / "out.npy"
    np.save(xp, x)
    np.save(yp, y)
    if case == "missing logits":
        return [d / "nope.npy", yp, "-o", out], [str(d / "nope.npy"), "no such file"]
    if case == "missing labels":
        return [xp, d / "nope.npy", "-o", out], [str(d / "nope.npy"), "no such file"]
    if case == "directory":
        return [d, yp, "-o", out], [str(d), "is a directory"]
    if case == "not npy":
        (d / "text.npy").write_text("1,2,3\n")
        return [d / "text.npy", yp, "-o", out], [str(d / "text.npy"), "not a .npy file"]
    if case == "truncated":
        data = xp.read_bytes()
        xp.write_bytes(data[:len(data) - 100])
        return [xp, yp, "-o", out], [str(xp), "truncated", "(50, 5)"]
    if case == "row count":
        np.save(yp, y[:49])
        return [xp, yp, "-o", out], [str(yp), "49 rows", "50"]
    if case == "text logits":
        np.save(xp, np.array([["a", "b"], ["c", "d"]]))
        return [xp, yp, "-o", out], [str(xp), "text dtype"]
    if case == "integer logits":
        np.save(xp, np.ones((50, 5), np.int32))
        return [xp, yp, "-o", out], [str(xp), "integer dtype int32"]
    if case == "float labels":
        np.save(yp, y.astype(np.float32))
        return [xp, yp, "-o", out], [str(yp), "integer class ids", "float32"]
    if case == "pickled":
        np.save(xp, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return [xp, yp, "-o", out], [str(xp), "Python objects"]
    if case == "label range":
        y[37] = 5
        np.save(yp, y)
        # --memory 1k: chunks of a few rows, so the row number must be the file's, not the chunk's.
        return [xp, yp, "-o", out, "--memory", "1k"], [str(yp), "labels[37] = 5 is outside [0, 5)"]
    if case == "axis 0":
        return [xp, yp, "-o", out, "--axis", "0"], ["--axis 0", "first axis"]
    if case == "several fields to npy":
        return [xp, yp, "-o", out, "--fields", "loss,lse"], [".npz"]
    if case == "missing folder":
        return [xp, yp, "-o", d / "no" / "out.npy"], ["does not exist"]
    if case == "budget below a row":
        return [xp, yp, "-o", out, "--memory", "8"], ["--memory 8", "raise the budget"]
    if case == "one class":
        np.save(xp, np.zeros((50, 1), np.float32))
        np.save(yp, np.zeros(50, np.int64))
        return [xp, yp, "-o", out], [str(xp), "sigmoid_cross_entropy"]
    raise KeyError(case)


BAD_CASES = ["missing logits", "missing labels", "directory", "not npy", "truncated", "row count",
             "text logits", "integer logits", "float labels", "pickled", "label range", "axis 0",
             "several fields to npy", "missing folder", "budget below a row", "one class"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_score_bad_input(tmp_path, case):
    args, words = _write_bad_case(case, tmp_path)
    before = set(os.listdir(tmp_path))
    status, out, err = run_cli("score", *args)
    assert status == 2, (status, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastxent score: error: "), lines[0]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert set(os.listdir(tmp_path)) == before  # no output, no temporary file left


def test_score_interrupted_leaves_no_output(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((50_000, 64), dtype=np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 64, 50_000))
    env = dict(os.environ, PYTHONPATH=REPO)
    # 4 KiB: chunks of 14 rows, 3,572 library calls: time to interrupt it.
    child = subprocess.Popen([sys.executable, "-m", "fastxent.cli", "score", tmp_path / "x.npy",
                              tmp_path / "y.npy", "-o", tmp_path / "out.npy", "--memory", "4k"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if any(name.endswith(".tmp") for name in os.listdir(tmp_path)):
            break
        time.sleep(0.002)
    if child.poll() is not None:
        pytest.skip("the run ended before it could be interrupted")
    time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    if child.returncode == 0:
        pytest.skip("the run ended before the signal arrived")
    assert child.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == "fastxent score: interrupted; no output written"
    assert sorted(os.listdir(tmp_path)) == ["x.npy", "y.npy"]
