"""fastxent.jax against optax: values and gradients, under jit, grad and vmap.

optax runs on the same inputs (upcast to float32 for 16-bit scores, whose
results fastxent accumulates in float32 and rounds once); gradients are
compared for the logits and, where optax has them, for the labels.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import fastxent as fx  # noqa: E402
import fastxent.jax as fxj  # noqa: E402

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]

#: (rtol, atol) per dtype against optax on float32 inputs.
TOLERANCE = {
    "float64": (1e-10, 1e-12),
    "float32": (2e-5, 2e-6),
    "bfloat16": (1.6e-2, 1e-5),
    "float16": (2e-3, 1e-5),
}


def _backend_runs(call):
    try:
        call()
    except (AttributeError, NotImplementedError):
        return False
    return True


@pytest.fixture
def sigmoid_backend(monkeypatch):
    """The default backend, or the float64 reference where the Numba kernel does not exist yet.

    Set through the environment: JAX runs callbacks on its own threads.
    """
    zeros = np.zeros((2, 3), np.float32)
    if not _backend_runs(lambda: fx.sigmoid_cross_entropy(zeros, zeros, return_grad=True)):
        monkeypatch.setenv("FASTXENT_BACKEND", "numpy")


def assert_close(actual, expected, dtype_name, what, scaled=False):
    """allclose with NaN == NaN; ``scaled`` widens atol to a few float32 ulps of the largest
    expected magnitude (for differences like ``lse - x`` that cancel)."""
    rtol, atol = TOLERANCE[dtype_name]
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    if scaled and e.size and dtype_name != "float64":
        atol = max(atol, 4 * float(np.finfo(np.float32).eps) * float(np.nanmax(np.abs(e))))
    ok = np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True) | (a == e)
    if not ok.all():
        bad = np.argwhere(~ok)[:8]
        lines = [f"{what}: {int((~ok).sum())} of {ok.size} differ (rtol={rtol}, atol={atol})"]
        lines += [f"  at {tuple(int(k) for k in i)}: got {a[tuple(i)]!r}, expected {e[tuple(i)]!r}" for i in bad]
        pytest.fail("\n".join(lines))


def _logits(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3
    x = np.where(rng.random(shape) < 0.05, x * 6, x)
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def _soft_labels(shape, axis=-1, seed=2):
    rng = np.random.default_rng(seed)
    y = rng.random(shape)
    y = np.where(rng.random(shape) < 0.3, 0.0, y)
    y = y / np.maximum(y.sum(axis=axis, keepdims=True), 1e-9)
    return jnp.asarray(y.astype(np.float32))


def _name(dtype):
    return jnp.dtype(dtype).name


def _check(ours, theirs, args, argnums, dtype_name, what):
    """Value, then the gradient of ``sum(loss * w)`` for a random ``w``, each under jit."""
    value = jax.jit(ours)(*args)
    expected = theirs(*[a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args])
    assert value.dtype == expected.dtype or dtype_name != "float32"
    assert_close(value, expected, dtype_name, f"{what} value")
    weights = jnp.asarray(np.random.default_rng(9).random(expected.shape).astype(np.float32) + 0.5)

    def objective(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights)

    got = jax.jit(jax.grad(objective(ours), argnums=argnums))(*args)
    want = jax.grad(objective(theirs), argnums=argnums)(
        *[a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args])
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == args[argnums[i]].dtype, f"{what} grad {i} dtype {g.dtype}"
        assert_close(g, w, dtype_name, f"{what} grad of argument {argnums[i]}", scaled=argnums[i] != 0)


# ----------------------------------------------------------------------------
# Values and gradients against optax
# ----------------------------------------------------------------------------

SHAPES_AXES = {
    "2d": ((6, 5), -1),
    "3d_last": ((2, 3, 7), -1),
    "3d_middle": ((2, 7, 3), 1),
    "3d_first": ((7, 2, 3), 0),
    "4d_tuple": ((2, 3, 4, 2), (2, 3)),
    "4d_tuple_reversed": ((2, 3, 4, 2), (3, 1)),
    "large": ((3, 50257), -1),
}


def _class_axes(shape, axis):
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(a % len(shape) for a in axes)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(SHAPES_AXES))
def test_integer_labels(dtype, case):
    shape, axis = SHAPES_AXES[case]
    axes = _class_axes(shape, axis)
    count = int(np.prod([shape[a] for a in axes]))
    batch = tuple(d for i, d in enumerate(shape) if i not in axes)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, count, batch))

    def ours(x):
        return fxj.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis)

    def theirs(x):
        return optax.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis)

    _check(ours, theirs, (_logits(shape, dtype),), (0,), _name(dtype), case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [c for c in SHAPES_AXES] + ["all_axes"])
def test_soft_labels(dtype, case):
    shape, axis = SHAPES_AXES[case] if case != "all_axes" else ((3, 4), None)
    axes = _class_axes(shape, axis) if axis is not None else tuple(range(len(shape)))
    labels = _soft_labels(shape, axis=axes)
    _check(lambda x, y: fxj.softmax_cross_entropy(x, y, axis=axis),
           lambda x, y: optax.softmax_cross_entropy(x, y, axis=axis),
           (_logits(shape, dtype), labels), (0, 1), _name(dtype), case)


@pytest.mark.parametrize("where_shape", ["full", "batch"])
def test_where(where_shape):
    shape = (6, 5)
    rng = np.random.default_rng(4)
    labels = jnp.asarray(rng.integers(0, 5, shape[:1]))
    if where_shape == "full":
        mask = rng.random(shape) < 0.7
        mask[0] = False  # a row with nothing left: loss 0
        mask[1, int(labels[1])] = False  # a label outside the mask
        mask[1, (int(labels[1]) + 1) % 5] = True
    else:
        mask = rng.random(shape[:1]) < 0.6
        mask[0] = False
    where = jnp.asarray(mask)
    soft = _soft_labels(shape)
    x = _logits(shape)
    _check(lambda xx: fxj.softmax_cross_entropy_with_integer_labels(xx, labels, where=where),
           lambda xx: optax.softmax_cross_entropy_with_integer_labels(xx, labels, where=where),
           (x,), (0,), "float32", f"integer labels where={where_shape}")
    _check(lambda xx: fxj.softmax_cross_entropy(xx, soft, where=where),
           lambda xx: optax.softmax_cross_entropy(xx, soft, where=where),
           (x,), (0,), "float32", f"soft labels where={where_shape}")
    # Label gradients: optax's are NaN at masked entries (-inf * 0 inside its
    # masked sum); fastxent's are 0 there and equal to optax's elsewhere.
    got = jax.grad(lambda yy: fxj.softmax_cross_entropy(x, yy, where=where).sum())(soft)
    want = jax.grad(lambda yy: optax.softmax_cross_entropy(x, yy, where=where).sum())(soft)
    full = np.broadcast_to(mask if mask.ndim == 2 else mask[:, None], shape)
    assert np.all(np.asarray(got)[~full] == 0.0)
    assert_close(np.asarray(got)[full], np.asarray(want)[full], "float32", "label grads inside where", scaled=True)
    assert float(fxj.softmax_cross_entropy_with_integer_labels(x, labels, where=where)[0]) == 0.0


def test_where_with_tuple_axis():
    shape, axis = (2, 3, 4), (1, 2)
    rng = np.random.default_rng(6)
    where = jnp.asarray(rng.random(shape) < 0.6)
    labels = jnp.asarray(rng.integers(0, 12, (2,)))
    _check(lambda xx: fxj.softmax_cross_entropy_with_integer_labels(xx, labels, axis=axis, where=where),
           lambda xx: optax.softmax_cross_entropy_with_integer_labels(xx, labels, axis=axis, where=where),
           (_logits(shape),), (0,), "float32", "tuple axis with where")


def test_label_conventions_follow_optax():
    x = _logits((4, 5))
    labels = jnp.asarray([0, -1, -5, 4])  # negative labels count from the end
    assert_close(fxj.softmax_cross_entropy_with_integer_labels(x, labels),
                 optax.softmax_cross_entropy_with_integer_labels(x, labels), "float32", "negative labels")
    bad = jnp.asarray([0, 5, -6, 1])
    ours = fxj.softmax_cross_entropy_with_integer_labels(x, bad)
    theirs = optax.softmax_cross_entropy_with_integer_labels(x, bad)
    assert np.array_equal(np.isnan(ours), np.isnan(theirs)) and np.isnan(ours[1]) and np.isnan(ours[2])
    assert_close(ours[np.array([0, 3])], theirs[np.array([0, 3])], "float32", "rows with valid labels")
    got = jax.grad(lambda xx: fxj.softmax_cross_entropy_with_integer_labels(xx, bad).sum())(x)
    want = jax.grad(lambda xx: optax.softmax_cross_entropy_with_integer_labels(xx, bad).sum())(x)
    assert_close(got, want, "float32", "gradient with out-of-range labels")


@pytest.mark.usefixtures("sigmoid_backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("labels_shape", ["same", "broadcast_row", "scalar"])
def test_sigmoid_binary_cross_entropy(dtype, labels_shape):
    shape = (6, 5)
    rng = np.random.default_rng(8)
    full = rng.random(shape)
    full = np.where(rng.random(shape) < 0.5, full.round(), full)
    labels = {"same": full, "broadcast_row": full[0], "scalar": np.asarray(1.0)}[labels_shape]
    labels = jnp.asarray(labels.astype(np.float32)).astype(dtype)
    _check(fxj.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy,
           (_logits(shape, dtype), labels), (0, 1), _name(dtype), f"sigmoid labels {labels_shape}")


@pytest.mark.usefixtures("sigmoid_backend")
def test_sigmoid_saturated_scores_stay_finite():
    x = jnp.asarray([-200.0, -30.0, 0.0, 30.0, 200.0])
    z = jnp.asarray([1.0, 1.0, 0.5, 0.0, 0.0])
    assert_close(fxj.sigmoid_binary_cross_entropy(x, z), optax.sigmoid_binary_cross_entropy(x, z),
                 "float32", "saturated")


# ----------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------

def test_vmap_matches_the_batched_call():
    x = _logits((3, 4, 6))
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 6, (3, 4)))
    batched = fxj.softmax_cross_entropy_with_integer_labels(x, labels)
    assert_close(jax.vmap(fxj.softmax_cross_entropy_with_integer_labels)(x, labels), batched, "float32", "vmap")
    shared = jax.vmap(fxj.softmax_cross_entropy_with_integer_labels, in_axes=(0, None))(x, labels[0])
    assert_close(shared, fxj.softmax_cross_entropy_with_integer_labels(x, jnp.broadcast_to(labels[0], (3, 4))),
                 "float32", "vmap with shared labels")
    moved = jax.vmap(fxj.softmax_cross_entropy_with_integer_labels, in_axes=(1, 1), out_axes=1)(x, labels)
    assert_close(moved, batched, "float32", "vmap over a middle axis")
    soft = _soft_labels((3, 4, 6))
    assert_close(jax.vmap(fxj.softmax_cross_entropy)(x, soft), fxj.softmax_cross_entropy(x, soft),
                 "float32", "vmap soft")


def test_per_example_gradients_with_vmap_of_grad():
    x = _logits((5, 7))
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 7, (5,)))

    def per_example(fn):
        return jax.jit(jax.vmap(jax.grad(lambda xi, yi: fn(xi, yi))))

    got = per_example(fxj.softmax_cross_entropy_with_integer_labels)(x, labels)
    want = per_example(optax.softmax_cross_entropy_with_integer_labels)(x, labels)
    assert_close(got, want, "float32", "vmap(grad)")
    soft = _soft_labels((5, 7))
    got = jax.vmap(jax.grad(fxj.softmax_cross_entropy, argnums=(0, 1)))(x, soft)
    want = jax.vmap(jax.grad(optax.softmax_cross_entropy, argnums=(0, 1)))(x, soft)
    for g, w in zip(got, want):
        assert_close(g, w, "float32", "vmap(grad) soft", scaled=True)


def test_training_step_under_jit():
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((8, 10)).astype(np.float32) * 0.3), "b": jnp.zeros(10)}
    data = jnp.asarray(rng.standard_normal((32, 8)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, (32,)))

    def step(loss_fn):
        def loss(p):
            return loss_fn(data @ p["w"] + p["b"], labels).mean()

        @jax.jit
        def update(p):
            value, grads = jax.value_and_grad(loss)(p)
            return value, jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p, grads)
        return update

    ours, theirs = step(fxj.softmax_cross_entropy_with_integer_labels), step(optax.softmax_cross_entropy_with_integer_labels)
    p_ours, p_theirs = params, params
    for _ in range(3):
        l_ours, p_ours = ours(p_ours)
        l_theirs, p_theirs = theirs(p_theirs)
        assert_close(l_ours, l_theirs, "float32", "loss")
    for key in params:
        assert_close(p_ours[key], p_theirs[key], "float32", f"updated {key}")


def _enable_x64():
    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()  # older JAX


def _float64_cases():
    """name -> (ours, optax's, args): the three losses (and ``where``) on float64 inputs."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((4, 5)))
    labels = jnp.asarray(rng.integers(0, 5, (4,)))
    soft = jnp.asarray(rng.random((4, 5)))
    z = jnp.asarray(rng.random((4, 5)))
    mask = jnp.asarray(rng.random((4, 5)) < 0.7).at[:, 0].set(True)
    assert x.dtype == jnp.float64
    return {
        "integer_labels": (lambda xx: fxj.softmax_cross_entropy_with_integer_labels(xx, labels),
                           lambda xx: optax.softmax_cross_entropy_with_integer_labels(xx, labels), (x,)),
        "integer_labels_where": (
            lambda xx: fxj.softmax_cross_entropy_with_integer_labels(xx, labels, where=mask),
            lambda xx: optax.softmax_cross_entropy_with_integer_labels(xx, labels, where=mask), (x,)),
        "soft_labels": (fxj.softmax_cross_entropy, optax.softmax_cross_entropy, (x, soft)),
        "soft_labels_where": (lambda xx, yy: fxj.softmax_cross_entropy(xx, yy, where=mask),
                              lambda xx, yy: optax.softmax_cross_entropy(xx, yy, where=mask), (x, soft)),
        "sigmoid": (fxj.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy, (x, z)),
    }


CASES_64 = ["integer_labels", "integer_labels_where", "soft_labels", "soft_labels_where", "sigmoid"]


@pytest.mark.usefixtures("sigmoid_backend")
@pytest.mark.parametrize("case, transform", [(c, "jit") for c in CASES_64]
                         + [(c, "vmap") for c in CASES_64 if not c.endswith("where")])
def test_check_grads_second_order_both_modes(case, transform):
    """``jax.test_util.check_grads(order=2, modes=["fwd", "rev"])``, as optax's own tests use it."""
    from jax.test_util import check_grads

    with _enable_x64():
        ours, _, args = _float64_cases()[case]
        if transform == "vmap":
            ours = jax.vmap(ours)
            args = tuple(jnp.stack([a, 0.5 * a]) for a in args)
        check_grads(jax.jit(ours), args, order=2, modes=["fwd", "rev"])


@pytest.mark.usefixtures("sigmoid_backend")
@pytest.mark.parametrize("case", CASES_64)
def test_forward_mode_and_hessians_match_optax(case):
    with _enable_x64():
        ours, theirs, args = _float64_cases()[case]
        argnums = tuple(range(len(args)))
        tangents = tuple(jnp.asarray(np.random.default_rng(i).standard_normal(a.shape)) for i, a in enumerate(args))
        assert_close(jax.jvp(ours, args, tangents)[1], jax.jvp(theirs, args, tangents)[1], "float64", "jvp")
        for name, transform in [("jacfwd", jax.jacfwd), ("jacrev", jax.jacrev), ("hessian", jax.hessian)]:
            got = jax.jit(transform(lambda *a: ours(*a).sum(), argnums=argnums))(*args)
            want = jax.jit(transform(lambda *a: theirs(*a).sum(), argnums=argnums))(*args)
            for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                # optax's label derivatives are NaN at masked entries (-inf * 0 inside
                # its masked sum); fastxent's are 0 there (see test_where).
                g, w = np.asarray(g), np.asarray(w)
                assert np.all(g[np.isnan(w)] == 0.0), f"{case} {name}: not 0 where optax is NaN"
                assert_close(np.where(np.isnan(w), 0.0, g), np.nan_to_num(w, nan=0.0), "float64",
                             f"{case} {name}")


def test_second_order_adds_no_callback_to_a_first_order_gradient():
    """A gradient traces the fused callback only; the softmax callback comes with second order."""
    x = _logits((4, 5))
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 5, (4,)))
    loss = lambda xx: fxj.softmax_cross_entropy_with_integer_labels(xx, labels).sum()  # noqa: E731
    first = str(jax.make_jaxpr(jax.grad(loss))(x))
    assert first.count("pure_callback") == 1 and "_host_softmax" not in first
    assert "_host_softmax" in str(jax.make_jaxpr(jax.hessian(loss))(x))


def test_static_errors_are_raised_at_trace_time():
    x = _logits((4, 3))
    with pytest.raises(TypeError, match="integer"):
        fxj.softmax_cross_entropy_with_integer_labels(x, jnp.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        fxj.softmax_cross_entropy_with_integer_labels(x, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="single class"):
        fxj.softmax_cross_entropy(_logits((4, 1)), jnp.ones((4, 1)))
    with pytest.raises(TypeError, match="floating"):
        fxj.softmax_cross_entropy(jnp.zeros((4, 3), jnp.int32), jnp.ones((4, 3)))
