"""One CPU training step with ``fastxent.torch.cross_entropy`` against ``torch.nn.functional.cross_entropy``.

The model is a small classifier with a 32000-class output layer
(``Linear(512, 512) -> ReLU -> Linear(512, 32000)``, batch 512, float32); a
step is forward, loss, backward and an SGD update. Run for real (nothing else
running on the machine)::

    python bench/bench_train_step.py                    # writes bench/results/train_step.md
    python bench/bench_train_step.py --reps 30 --batch 1024

Time: both steps in the same process on the same data, alternating (the order
flips every repetition), median of ``--reps`` steps after ``--warmup`` steps
each; the loss alone (forward + backward on fixed logits) is timed the same way.

Memory, three figures per loss, each measured in a fresh subprocess per loss
after warm-up steps:

* saved: the bytes the autograd graph keeps between forward and backward
  (``torch.autograd.graph.saved_tensors_hooks``, unique storages);
* loss peak: the high-water mark of the resident set (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``) during the loss's forward and
  backward on fixed logits that require grad, minus the resident set before
  (no gradient held then); it includes the logits' gradient, which both
  losses must produce;
* step peak: the same for a whole training step (gradients cleared before).

glibc's malloc is told to hand every block over 64 KiB back to the system on
free (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows the live
allocations of torch, numpy and Numba alike. torch has no CPU allocator
statistics, and ``tracemalloc`` does not see torch's allocations.

In the normal test run (pytest, benchmarks disabled) ``bench_train_step``
runs one step of a scaled-down model per loss and checks that the two losses
and the updated weights agree.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastxent.torch as fxt  # noqa: E402

LOSSES = {"fastxent": fxt.cross_entropy, "torch": F.cross_entropy}
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.md"


@dataclass(frozen=True)
class Size:
    batch: int = 512
    features: int = 512
    hidden: int = 512
    classes: int = 32000


FULL = Size()
SMOKE = Size(batch=16, features=8, hidden=16, classes=320)


# ----------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------

def make_model(size, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(size.features, size.hidden), torch.nn.ReLU(),
                               torch.nn.Linear(size.hidden, size.classes))


def make_data(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size.batch, size.features, generator=g),
            torch.randint(0, size.classes, (size.batch,), generator=g))


def make_step(model, loss_fn, data, target, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(data), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    step.clear = lambda: optimizer.zero_grad(set_to_none=True)
    return step


def make_loss_only(logits, loss_fn, target):
    leaf = logits.detach().requires_grad_(True)

    def run():
        leaf.grad = None
        loss = loss_fn(leaf, target)
        loss.backward()
        return loss.detach()

    def clear():
        leaf.grad = None

    run.clear = clear
    return run


# ----------------------------------------------------------------------------
# pytest: a smoke test of the step (benchmarks disabled) or pytest-benchmark timing
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("entry", list(LOSSES))
def bench_train_step(benchmark, entry):
    size = SMOKE if benchmark.disabled else FULL
    benchmark.group = f"train_step|{size.batch}x{size.hidden}->{size.classes}|float32"
    data, target = make_data(size)
    model = make_model(size)
    other = make_model(size)
    other_name = "torch" if entry == "fastxent" else "fastxent"
    loss = benchmark(make_step(model, LOSSES[entry], data, target))
    if benchmark.disabled:
        expected = make_step(other, LOSSES[other_name], data, target)()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for p, q in zip(model.parameters(), other.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Script: alternating timing, memory in subprocesses, markdown
# ----------------------------------------------------------------------------

def time_alternating(size, warmup, reps):
    data, target = make_data(size)
    steps = {name: make_step(make_model(size), fn, data, target) for name, fn in LOSSES.items()}
    with torch.no_grad():
        logits = make_model(size)(data)
    losses = {name: make_loss_only(logits, fn, target) for name, fn in LOSSES.items()}
    results = {}
    for kind, calls in (("step", steps), ("loss", losses)):
        times = round_robin(calls, warmup, reps)
        results[kind] = {name: statistics.median(ts) for name, ts in times.items()}
        results[kind + "_all"] = times
    return results


def round_robin(calls, warmup, reps):
    """``{name: [seconds per timed call]}``: every call once per repetition, the order
    reversed every other one, the first ``warmup`` repetitions untimed."""
    times = {name: [] for name in calls}
    order = list(calls)
    for rep in range(warmup + reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            calls[name]()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(elapsed)
    return times


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set


def _peak_delta(call, repeat=3):
    """Peak resident-set increase during ``call()``, starting with no gradient held."""
    deltas = []
    for _ in range(repeat):
        call.clear()
        _reset_peak()
        before = _status_kib("VmRSS")
        call()
        deltas.append(_status_kib("VmHWM") - before)
    return statistics.median(deltas) * 1024


def _saved_bytes(logits, loss_fn, target):
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    leaf = logits.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(leaf, target)
    loss.backward()
    return sum(storages.values())


def memory_of(entry, size):
    """Run in a subprocess: the memory figures of one loss."""
    data, target = make_data(size)
    model = make_model(size)
    step = make_step(model, LOSSES[entry], data, target)
    with torch.no_grad():
        logits = model(data)
    loss_only = make_loss_only(logits, LOSSES[entry], target)
    for _ in range(3):
        step()
        loss_only()
    saved = _saved_bytes(logits, LOSSES[entry], target)
    return {"saved": saved, "loss_peak": _peak_delta(loss_only), "step_peak": _peak_delta(step)}


def _memory_in_subprocess(entry, size):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = [sys.executable, __file__, "--memory-of", entry, "--batch", str(size.batch),
            "--classes", str(size.classes)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mb(value):
    return f"{value / 1e6:.1f} MB"


def render(size, timing, memory, args, command):
    logits_bytes = size.batch * size.classes * 4
    step_ratio = timing["step"]["fastxent"] / timing["step"]["torch"]
    loss_ratio = timing["loss"]["fastxent"] / timing["loss"]["torch"]
    load = os.getloadavg()
    lines = [
        "# One CPU training step: `fastxent.torch.cross_entropy` vs `torch.nn.functional.cross_entropy`",
        "",
        f"Model `Linear({size.features}, {size.hidden}) -> ReLU -> Linear({size.hidden}, {size.classes})`, "
        f"batch {size.batch}, float32, SGD; logits {_mb(logits_bytes)}. Same process, same data, "
        f"alternating order, median of {args.reps} after {args.warmup} warm-up steps.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        "",
        "## Time",
        "",
        "| | fastxent.torch | torch | ratio (fastxent / torch) |",
        "|---|---:|---:|---:|",
        f"| training step | {timing['step']['fastxent'] * 1e3:.1f} ms | {timing['step']['torch'] * 1e3:.1f} ms "
        f"| **{step_ratio:.3f}** |",
        f"| loss forward + backward only | {timing['loss']['fastxent'] * 1e3:.1f} ms "
        f"| {timing['loss']['torch'] * 1e3:.1f} ms | {loss_ratio:.3f} |",
        "",
        "## Memory of the loss",
        "",
        "| | fastxent.torch | torch |",
        "|---|---:|---:|",
        f"| saved for backward (saved_tensors_hooks) | {_mb(memory['fastxent']['saved'])} "
        f"| {_mb(memory['torch']['saved'])} |",
        f"| peak RSS increase, loss forward + backward (includes the logits' grad) "
        f"| {_mb(memory['fastxent']['loss_peak'])} | {_mb(memory['torch']['loss_peak'])} |",
        f"| peak RSS increase, whole training step | {_mb(memory['fastxent']['step_peak'])} "
        f"| {_mb(memory['torch']['step_peak'])} |",
        "",
        "Peak RSS: `VmHWM` reset through `/proc/self/clear_refs` before the measured call, minus "
        "`VmRSS` before it, median of 3, one subprocess per loss, with "
        "`MALLOC_MMAP_THRESHOLD_=65536` so that freed blocks leave the resident set. The fused "
        "forward saves the gradient (one logits-sized buffer) and hands it to backward as is; "
        "torch saves `log_softmax` (logits-sized) and allocates two more logits-sized buffers "
        "in backward (nll_loss's and log_softmax's gradients).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=FULL.batch)
    parser.add_argument("--classes", type=int, default=FULL.classes)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-of", choices=list(LOSSES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = Size(batch=args.batch, classes=args.classes)
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, size)))
        return
    command = "python bench/bench_train_step.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    memory = {entry: _memory_in_subprocess(entry, size) for entry in LOSSES}
    timing = time_alternating(size, args.warmup, args.reps)
    text = render(size, timing, memory, args, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
