"""fastxent.keras against Keras's own losses (TensorFlow backend): values, gradients, a training step.

KERAS_BACKEND is set to tensorflow before Keras is imported. Keras's losses
run on the same inputs; the training-step tests build two identical models,
compile one with the fastxent loss and one with Keras's, run one
``train_on_batch`` each and compare the updated weights.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # Keras was imported earlier with another backend
    pytest.skip(f"Keras is already loaded with the {keras.backend.backend()} backend", allow_module_level=True)

import fastxent as fx  # noqa: E402
import fastxent.keras as fxk  # noqa: E402

RTOL, ATOL = 2e-5, 2e-6
REDUCTIONS = ["sum_over_batch_size", "sum", "none", "mean_with_sample_weight"]


def _default_backend_runs():
    """True when the default backend has every family the Keras losses use."""
    zeros = np.full((2, 3), 0.5, np.float32)
    calls = [
        lambda: fx.sigmoid_cross_entropy(zeros, zeros, return_grad=True),
        lambda: fx.binary_cross_entropy(zeros, zeros, return_grad=True),
        lambda: fx.categorical_cross_entropy(zeros, zeros, return_grad=True),
        lambda: fx.sparse_categorical_cross_entropy(zeros, np.zeros(2, np.int64), return_grad=True),
    ]
    try:
        for call in calls:
            call()
    except (AttributeError, NotImplementedError):
        return False
    return True


@pytest.fixture(autouse=True)
def probability_backend(monkeypatch):
    """The default backend, or the float64 reference where the Numba kernels do not exist yet.

    Set through the environment: tf.numpy_function runs on TensorFlow's threads.
    """
    if not _default_backend_runs():
        monkeypatch.setenv("FASTXENT_BACKEND", "numpy")


def assert_close(actual, expected, what, rtol=RTOL, atol=ATOL):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    ok = np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if not ok.all():
        bad = np.argwhere(~ok)[:8]
        lines = [f"{what}: {int((~ok).sum())} of {ok.size} differ (rtol={rtol}, atol={atol})"]
        lines += [f"  at {tuple(int(k) for k in i)}: got {a[tuple(i)]!r}, expected {e[tuple(i)]!r}" for i in bad]
        pytest.fail("\n".join(lines))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _inputs(kind, from_logits, shape):
    """(y_true, y_pred) for a loss kind; probabilities kept away from the clip bounds."""
    rng = _rng(1)
    scores = (rng.standard_normal(shape) * 2).astype(np.float32)
    if kind == "binary":
        y_true = np.where(rng.random(shape) < 0.5, rng.random(shape).round(), rng.random(shape)).astype(np.float32)
        y_pred = scores if from_logits else tf.sigmoid(scores).numpy()
        return y_true, y_pred
    y_pred = scores if from_logits else tf.nn.softmax(scores, axis=-1).numpy()
    ids = rng.integers(0, shape[-1], shape[:-1])
    if kind == "sparse":
        return ids, y_pred
    soft = rng.random(shape)
    soft = (soft / soft.sum(-1, keepdims=True)).astype(np.float32)
    return soft, y_pred


PAIRS = {
    "sparse": (fxk.SparseCategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy),
    "categorical": (fxk.CategoricalCrossentropy, keras.losses.CategoricalCrossentropy),
    "binary": (fxk.BinaryCrossentropy, keras.losses.BinaryCrossentropy),
}
OPTIONS = {
    "sparse": [{}, {"ignore_class": 2}],
    "categorical": [{}, {"label_smoothing": 0.1}],
    "binary": [{}, {"label_smoothing": 0.2}],
}
CASES = [(kind, i) for kind in PAIRS for i in range(len(OPTIONS[kind]))]
CASE_IDS = [f"{kind}-{'plain' if i == 0 else next(iter(OPTIONS[kind][i]))}" for kind, i in CASES]


def _value_and_grad(loss, y_true, y_pred, sample_weight=None):
    variable = tf.Variable(y_pred)
    with tf.GradientTape() as tape:
        value = loss(y_true, variable, sample_weight=sample_weight)
        ramp = tf.reshape(tf.cast(tf.range(1, tf.size(value) + 1), value.dtype), tf.shape(value))
        total = tf.reduce_sum(value * ramp)  # a non-uniform incoming gradient for "none"
    return value.numpy(), tape.gradient(total, variable).numpy()


# ----------------------------------------------------------------------------
# Values and gradients against Keras
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("kind, option", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
def test_values_and_gradients_match_keras(kind, option, from_logits, reduction, weighted):
    options = OPTIONS[kind][option]
    ours_cls, theirs_cls = PAIRS[kind]
    y_true, y_pred = _inputs(kind, from_logits, (8, 5))
    if kind == "sparse" and "ignore_class" in options:
        y_true = y_true.copy()
        y_true[:3] = options["ignore_class"]
    sample_weight = _rng(2).random(8).astype(np.float32) if weighted else None
    ours = ours_cls(from_logits=from_logits, reduction=reduction, **options)
    theirs = theirs_cls(from_logits=from_logits, reduction=reduction, **options)
    value, grad = _value_and_grad(ours, y_true, y_pred, sample_weight)
    expected_value, expected_grad = _value_and_grad(theirs, y_true, y_pred, sample_weight)
    assert_close(value, expected_value, "value")
    assert_close(grad, expected_grad, "gradient")


@pytest.mark.parametrize("kind", list(PAIRS))
def test_higher_rank_and_label_shapes(kind):
    ours_cls, theirs_cls = PAIRS[kind]
    y_true, y_pred = _inputs(kind, True, (3, 4, 6))
    for label in ([y_true, y_true[..., None]] if kind == "sparse" else [y_true]):
        ours = ours_cls(from_logits=True, reduction="none")
        theirs = theirs_cls(from_logits=True, reduction="none")
        value, grad = _value_and_grad(ours, label, y_pred)
        expected_value, expected_grad = _value_and_grad(theirs, label, y_pred)
        assert_close(value, expected_value, f"{kind} rank-3 value (labels {np.shape(label)})")
        assert_close(grad, expected_grad, f"{kind} rank-3 gradient")
    if kind == "binary":  # (N,) labels against (N, 1) predictions: Keras expands the labels
        y_true, y_pred = _inputs(kind, True, (6, 1))
        assert_close(ours_cls(from_logits=True)(y_true[:, 0], y_pred),
                     theirs_cls(from_logits=True)(y_true[:, 0], y_pred), "binary (N,) vs (N, 1)")


@pytest.mark.parametrize("kind", list(PAIRS))
def test_gradients_inside_tf_function(kind):
    ours_cls, theirs_cls = PAIRS[kind]
    y_true, y_pred = _inputs(kind, True, (6, 4))

    def graph_grad(loss):
        variable = tf.Variable(y_pred)

        @tf.function
        def run():
            with tf.GradientTape() as tape:
                value = loss(y_true, variable)
            return value, tape.gradient(value, variable)

        return [t.numpy() for t in run()]

    for a, b in zip(graph_grad(ours_cls(from_logits=True)), graph_grad(theirs_cls(from_logits=True))):
        assert_close(a, b, f"{kind} in tf.function")


CONFIG_CASES = {
    "sparse": (fxk.SparseCategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy,
               dict(from_logits=True, ignore_class=-1, reduction="sum", axis=1, name="scce", dtype="float64")),
    "categorical": (fxk.CategoricalCrossentropy, keras.losses.CategoricalCrossentropy,
                    dict(from_logits=True, label_smoothing=0.1, axis=1, reduction="none", name="cce",
                         dtype="float64")),
    "binary": (fxk.BinaryCrossentropy, keras.losses.BinaryCrossentropy,
               dict(from_logits=True, label_smoothing=0.2, axis=0, reduction="mean", name="bce",
                    dtype="float64")),
}


@pytest.mark.parametrize("kind", list(CONFIG_CASES))
def test_config_round_trips_every_constructor_argument(kind):
    ours_cls, theirs_cls, kwargs = CONFIG_CASES[kind]
    loss = ours_cls(**kwargs)
    config = loss.get_config()
    assert config == {**kwargs, "reduction": loss.reduction}, config  # every argument, axis and dtype included
    keras_config = theirs_cls(**kwargs).get_config()
    assert {k: v for k, v in config.items() if k in keras_config} == keras_config  # a superset of Keras's
    for again in (ours_cls.from_config(config), keras.losses.deserialize(keras.losses.serialize(loss))):
        assert type(again) is ours_cls and again.get_config() == config
        assert again.axis == kwargs["axis"] and again.dtype == "float64"
    assert isinstance(loss, theirs_cls)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_saved_and_reloaded_model_computes_the_same_loss(kind, tmp_path):
    ours_cls, _ = PAIRS[kind]
    axis = 1 if kind != "binary" else -1
    options = {"sparse": {"ignore_class": 0}, "categorical": {"label_smoothing": 0.1},
               "binary": {"label_smoothing": 0.2}}[kind]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 4))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))  # (batch, 5, 4): classes on axis 1 or -1
    model.compile(optimizer="sgd", loss=ours_cls(from_logits=True, axis=axis, **options))
    rng = _rng(4)
    data = rng.standard_normal((6, 5, 4)).astype(np.float32)
    if kind == "sparse":
        target = rng.integers(0, 5, (6, 4))
    elif kind == "categorical":
        target = np.moveaxis(np.eye(5, dtype=np.float32)[rng.integers(0, 5, (6, 4))], -1, 1)
    else:
        target = (rng.random((6, 5, 4)) < 0.5).astype(np.float32)
    before = model.evaluate(data, target, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded.loss) is ours_cls and reloaded.loss.get_config() == model.loss.get_config()
    assert reloaded.loss.axis == axis
    assert_close(reloaded.evaluate(data, target, verbose=0), before, "reloaded loss")


@pytest.mark.parametrize("kind", list(PAIRS))
def test_shape_mismatch_is_keras_value_error_at_trace_time(kind):
    ours_cls, theirs_cls = PAIRS[kind]
    y_pred = np.full((3, 3), 1 / 3, np.float32)
    y_true = np.array([0, 1, 2, 1]) if kind == "sparse" else np.array([[0.0], [1.0], [1.0]])

    @tf.function(autograph=False)
    def traced(loss):
        return loss(y_true, y_pred)

    messages = []
    for loss in (theirs_cls(), ours_cls()):
        with pytest.raises(ValueError, match="must have the same shape") as error:
            traced(loss)  # raised while tracing, before anything runs
        messages.append(str(error.value))
    assert messages[0] == messages[1]  # Keras's own message


def test_second_derivatives_raise_instead_of_missing_terms():
    y_true, y_pred = _inputs("sparse", True, (4, 3))
    variable = tf.Variable(y_pred)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = fxk.SparseCategoricalCrossentropy(from_logits=True)(y_true, variable)
        grad = inner.gradient(value, variable)
        penalty = tf.reduce_sum(grad * grad)
    _, expected = _value_and_grad(keras.losses.SparseCategoricalCrossentropy(from_logits=True), y_true, y_pred)
    assert_close(grad, expected, "first order inside a nested tape")  # a reduced loss: the ramp is [1]
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        outer.gradient(penalty, variable)


def test_bad_labels_raise_with_fastxents_message():
    with pytest.raises(Exception, match="outside"):
        fxk.SparseCategoricalCrossentropy(from_logits=True)(np.array([0, 7]), np.zeros((2, 3), np.float32))


# ----------------------------------------------------------------------------
# One training step against Keras's own loss
# ----------------------------------------------------------------------------

STEP_CASES = {
    "sparse_logits": ("sparse", True, None),
    "sparse_softmax_output": ("sparse", False, "softmax"),
    "sparse_ignore_class": ("sparse", True, None),
    "categorical_logits": ("categorical", True, None),
    "categorical_softmax_output": ("categorical", False, "softmax"),
    "binary_logits": ("binary", True, None),
    "binary_sigmoid_output": ("binary", False, "sigmoid"),
}


def _model(classes, activation):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    outputs = keras.layers.Dense(classes, activation=activation)(hidden)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_one_training_step_matches_keras(case):
    kind, from_logits, activation = STEP_CASES[case]
    classes = 5
    rng = _rng(3)
    data = rng.standard_normal((32, 8)).astype(np.float32)
    if kind == "sparse":
        target = rng.integers(0, classes, (32,))
        if case == "sparse_ignore_class":
            target[::4] = -1
    elif kind == "categorical":
        target = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, (32,))]
    else:
        target = (rng.random((32, classes)) < 0.4).astype(np.float32)
    options = {"ignore_class": -1} if case == "sparse_ignore_class" else {}
    if kind in ("categorical", "binary"):
        options = {"label_smoothing": 0.1}
    ours_cls, theirs_cls = PAIRS[kind]
    sample_weight = rng.random(32).astype(np.float32)

    ours, theirs = _model(classes, activation), _model(classes, activation)
    theirs.set_weights(ours.get_weights())
    ours.compile(optimizer=keras.optimizers.SGD(0.5), loss=ours_cls(from_logits=from_logits, **options))
    theirs.compile(optimizer=keras.optimizers.SGD(0.5), loss=theirs_cls(from_logits=from_logits, **options))
    assert not ours.jit_compile
    for _ in range(2):
        loss_ours = ours.train_on_batch(data, target, sample_weight=sample_weight)
        loss_theirs = theirs.train_on_batch(data, target, sample_weight=sample_weight)
        assert_close(loss_ours, loss_theirs, f"{case} loss", rtol=1e-5)
    moved = False
    for a, b, start in zip(ours.get_weights(), theirs.get_weights(), _model(classes, activation).get_weights()):
        assert_close(a, b, f"{case} updated weights", rtol=1e-5, atol=1e-6)
        moved |= not np.allclose(a, start)
    assert moved, "the training step did not change the weights"
    assert_close(ours.evaluate(data, target, verbose=0), theirs.evaluate(data, target, verbose=0),
                 f"{case} evaluate", rtol=1e-5)
