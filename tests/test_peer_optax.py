"""optax's own tests of the three losses, run with optax's functions replaced by fastxent.jax.

The test classes come from the installed wheel (``optax/losses/_classification_test.py``),
not a copy: each is subclassed with :class:`tests.peers.ThroughFastxent`, which
replaces ``optax.losses._classification.softmax_cross_entropy``,
``softmax_cross_entropy_with_integer_labels`` and ``sigmoid_binary_cross_entropy``
(the names the tests call) by fastxent's and checks that every test called them
and ran fastxent's kernels. Only the classes of these three losses run (the other
losses in that file are optax's own code).
"""

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("absl.testing")

from optax.losses import _classification  # noqa: E402
from optax.losses import _classification_test as peer  # noqa: E402

import fastxent.jax as fxj  # noqa: E402
from tests.peers import ThroughFastxent, with_deviations  # noqa: E402


class _Optax(ThroughFastxent):
    module = _classification
    replacements = {
        "softmax_cross_entropy": fxj.softmax_cross_entropy,
        "softmax_cross_entropy_with_integer_labels": fxj.softmax_cross_entropy_with_integer_labels,
        "sigmoid_binary_cross_entropy": fxj.sigmoid_binary_cross_entropy,
    }


#: optax tests that fail through fastxent on purpose, per class: {test: reason}.
DEVIATIONS = {
    "TestOptaxSoftmaxCrossEntropy": {
        name: "draws an unseeded random mask over 5 or 10 classes and calls the loss on the classes "
              "it keeps; when it keeps one (16% of runs at 5) or none, fastxent refuses a softmax over "
              "fewer than 2 classes (ValueError pointing to sigmoid_binary_cross_entropy) where optax "
              "returns 0, so the test fails at random"
        for name in ("test_mask0", "test_mask1")
    },
}


@with_deviations(DEVIATIONS)
class TestOptaxSoftmaxCrossEntropy(_Optax, peer.SoftmaxCrossEntropyTest):
    pass


@with_deviations(DEVIATIONS)
class TestOptaxSoftmaxCrossEntropyWithIntegerLabels(_Optax, peer.SoftmaxCrossEntropyWithIntegerLabelsTest):
    pass


@with_deviations(DEVIATIONS)
class TestOptaxSigmoidCrossEntropy(_Optax, peer.SigmoidCrossEntropyTest):
    pass

