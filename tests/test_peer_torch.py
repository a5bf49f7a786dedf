"""PyTorch's own sample inputs for its cross-entropy losses, run through fastxent.torch.

The inputs come from the installed wheel, not copies: the ``OpInfo`` samples of
``nn.functional.cross_entropy`` and ``nn.functional.binary_cross_entropy_with_logits``
(``torch.testing._internal.common_methods_invocations.op_db``) and the
``ModuleInfo`` inputs of ``nn.CrossEntropyLoss`` and ``nn.BCEWithLogitsLoss``
(``common_modules.module_db``, error inputs included). ``torch.nn.functional``'s
two functions are replaced by fastxent's, so the samples call them, and torch's
own modules (whose ``forward`` looks them up there) run on fastxent too.

Each sample gets what PyTorch's ``test_ops``/``test_modules`` check, as far as
the OpInfo/ModuleInfo flags say the op supports it: the value and the gradient
(for a random incoming gradient) against torch's own function in float64, in
every dtype the database lists; in float64, where the loss is finite (a random
target may ignore every row, and finite differences of NaN fail for torch's
own function too), ``gradcheck`` (batched gradients, forward mode) and
``gradgradcheck`` (batched, forward over reverse), in fast mode as torch's
suite runs them, plus ``torch.func.vmap`` and ``jvp`` against torch's.
Counters prove every sample went through fastxent's kernels.

Targets are detached: derivatives with respect to the target are torch's own
by design (fastxent.torch delegates those calls to torch), and
``tests/test_torch_adapter.py`` checks that delegation.
"""

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal imports it
import torch.nn.functional as F  # noqa: E402

import fastxent  # noqa: E402
import fastxent.torch as fxt  # noqa: E402
from tests.peers import KERNEL_FUNCTIONS, Routing  # noqa: E402

#: The functions the samples call, replaced in torch.nn.functional by fastxent's.
FUNCTIONS = {
    "cross_entropy": (fxt.cross_entropy, fxt._torch_cross_entropy),
    "binary_cross_entropy_with_logits": (fxt.binary_cross_entropy_with_logits, fxt._torch_bce_with_logits),
}
OPS = {"nn.functional.cross_entropy": "cross_entropy",
       "nn.functional.binary_cross_entropy_with_logits": "binary_cross_entropy_with_logits"}
MODULES = {"nn.CrossEntropyLoss": ("cross_entropy", fxt.CrossEntropyLoss),
           "nn.BCEWithLogitsLoss": ("binary_cross_entropy_with_logits", fxt.BCEWithLogitsLoss)}

#: (rtol, atol) against torch in float64: fastxent accumulates 16-bit inputs in
#: float32 and rounds once. Sample scores lie in [-9, 9] and weights may have
#: either sign, so atol is scaled by the largest expected magnitude.
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6),
             torch.bfloat16: (1.6e-2, 4e-3), torch.float16: (2e-3, 5e-4)}


@functools.lru_cache(maxsize=None)
def _databases():
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db

    ops = {op.name: op for op in op_db if op.name in OPS and not op.variant_test_name}
    modules = {m.name: m for m in module_db if m.name in MODULES}
    assert set(ops) == set(OPS) and set(modules) == set(MODULES), (set(ops), set(modules))
    return ops, modules


@pytest.fixture
def routing(monkeypatch):
    """torch.nn.functional's two functions replaced by fastxent's; calls counted."""
    counters = Routing()
    for name in KERNEL_FUNCTIONS:
        monkeypatch.setattr(fastxent, name, counters.counting(counters.kernels, name, getattr(fastxent, name)))
    for name, (ours, _) in FUNCTIONS.items():
        monkeypatch.setattr(F, name, counters.entry(name, ours))
    return counters


def _assert_close(actual, expected, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    scale = float(expected.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol * max(1.0, scale), equal_nan=True, msg=lambda m: f"{what}: {m}")


def _double(value):
    return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _check_call(name, routing, x, target, kwargs, dtype, what, flags):
    """One sample: value, gradient, and (float64) gradcheck, gradgradcheck, vmap, jvp."""
    ours_fn = getattr(F, name)  # fastxent's, counted
    _, theirs_fn = FUNCTIONS[name]
    kernels = sum(routing.kernels.values())
    ours = ours_fn(x, target, **kwargs)
    assert sum(routing.kernels.values()) > kernels, f"{what}: no fastxent kernel ran"
    reference_input = x.detach().double().requires_grad_(True)
    theirs = theirs_fn(reference_input, _double(target), **{k: _double(v) for k, v in kwargs.items()})
    assert ours.dtype == dtype and ours.shape == theirs.shape, f"{what}: {ours.dtype} {ours.shape}"
    _assert_close(ours, theirs, dtype, f"{what} value")
    incoming = torch.rand(ours.shape, dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad(ours, x, incoming.to(dtype))
    (expected,) = torch.autograd.grad(theirs, reference_input, incoming)
    _assert_close(grad, expected, dtype, f"{what} gradient")
    if dtype != torch.float64 or not bool(torch.isfinite(theirs).all()):
        # Finite differences of a NaN (a mean over rows that are all ignored, which
        # a random target can draw) are NaN for torch's own function too.
        return

    def ours_of(xx):
        return ours_fn(xx, target, **kwargs)

    def theirs_of(xx):
        return theirs_fn(xx, target, **kwargs)

    torch.autograd.gradcheck(ours_of, (x,), check_batched_grad=flags["batched_grad"],
                             check_forward_ad=flags["forward_ad"], fast_mode=True)
    if flags["gradgrad"]:
        torch.autograd.gradgradcheck(ours_of, (x,), check_batched_grad=flags["batched_gradgrad"],
                                     check_fwd_over_rev=flags["fwgrad_bwgrad"], fast_mode=True)
    plain = x.detach()
    batch = torch.stack([plain, 0.5 * plain])
    _assert_close(torch.func.vmap(ours_of)(batch), torch.func.vmap(theirs_of)(batch), dtype, f"{what} vmap")
    tangent = torch.randn_like(plain)
    _assert_close(torch.func.jvp(ours_of, (plain,), (tangent,))[1],
                  torch.func.jvp(theirs_of, (plain,), (tangent,))[1], dtype, f"{what} jvp")


def _describe(sample):
    shapes = [tuple(t.shape) for t in (sample.input, *sample.args)]
    options = {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in sample.kwargs.items()}
    return f"shapes {shapes} {options}"


def _same(a, b):
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)


def _run_all(checks):
    """Run every check; fail once with all the failures listed."""
    failures = []
    for what, check in checks:
        try:
            check()
        except Exception as error:  # noqa: BLE001 -- collect, then report them all
            failures.append(f"{what}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    assert not failures, f"{len(failures)} of {len(checks)} failed:\n" + "\n".join(failures)
    return len(checks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_opinfo_samples_through_fastxent(op_name, dtype, routing):
    op = _databases()[0][op_name]
    assert dtype in op.supported_dtypes("cpu")
    name = OPS[op_name]
    flags = dict(batched_grad=op.check_batched_grad, forward_ad=op.supports_forward_ad,
                 gradgrad=op.supports_gradgrad, batched_gradgrad=op.check_batched_gradgrad,
                 fwgrad_bwgrad=op.supports_fwgrad_bwgrad)
    torch.manual_seed(0)
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    checks = [(f"{op_name} {dtype} sample {i} {_describe(sample)}",
               functools.partial(_check_call, name, routing, sample.input, sample.args[0].detach(),
                                 sample.kwargs, dtype, f"sample {i}", flags))
              for i, sample in enumerate(samples)]
    count = _run_all(checks)
    assert routing.entries[name] >= count, routing.summary()


@pytest.mark.parametrize("module_name, dtype", [(m, d) for m in MODULES for d in
                                                (torch.float64, torch.float32, torch.float16)
                                                if not (m == "nn.BCEWithLogitsLoss" and d == torch.float16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_moduleinfo_inputs_through_fastxent(module_name, dtype, routing):
    """torch's own module (its forward calls the replaced function) and fastxent's subclass."""
    info = _databases()[1][module_name]
    assert dtype in info.dtypes
    name, ours_cls = MODULES[module_name]
    flags = dict(batched_grad=True, forward_ad=True, gradgrad=True, batched_gradgrad=True, fwgrad_bwgrad=True)
    torch.manual_seed(0)
    module_inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)

    def check(module_input, what):
        c = module_input.constructor_input
        x, target = module_input.forward_input.args
        target = target.detach()
        torch_module = info.module_cls(*c.args, **c.kwargs)
        kwargs = {"reduction": torch_module.reduction}
        for attribute in ("weight", "pos_weight"):
            if getattr(torch_module, attribute, None) is not None:
                kwargs[attribute] = getattr(torch_module, attribute)
        for attribute in ("ignore_index", "label_smoothing"):
            if hasattr(torch_module, attribute):
                kwargs[attribute] = getattr(torch_module, attribute)
        entries = routing.entries[name]
        _same(torch_module(x, target), getattr(F, name)(x, target, **kwargs))
        assert routing.entries[name] == entries + 2, f"{what}: torch's module did not call fastxent"
        _same(ours_cls(*c.args, **c.kwargs)(x, target), torch_module(x, target))
        _check_call(name, routing, x, target, kwargs, dtype, what, flags)

    checks = [(f"{module_name} {dtype} {m.desc}", functools.partial(check, m, m.desc)) for m in module_inputs]
    _run_all(checks)


def test_module_error_inputs_are_refused(routing):
    """torch's error inputs for CrossEntropyLoss: fastxent refuses each one too.

    As ValueError/TypeError naming the value (fastxent's contract) where torch
    raises RuntimeError/ValueError with its own message: a listed deviation.
    """
    info = _databases()[1]["nn.CrossEntropyLoss"]
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                           training=True)
    assert errors
    for error in errors:
        c = error.module_error_input.constructor_input
        args = error.module_error_input.forward_input.args
        with pytest.raises((ValueError, TypeError)):
            info.module_cls(*c.args, **c.kwargs)(*args)
        with pytest.raises(error.error_type, match=error.error_regex):  # torch's own, for the record
            FUNCTIONS["cross_entropy"][1](*args, **_module_kwargs(info.module_cls(*c.args, **c.kwargs)))
    assert routing.entries["cross_entropy"] == len(errors)


def _module_kwargs(module):
    return dict(weight=module.weight, ignore_index=module.ignore_index, reduction=module.reduction,
                label_smoothing=module.label_smoothing)
