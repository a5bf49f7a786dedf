"""Keras's own tests of the three cross-entropy losses, run with Keras's classes replaced by fastxent.keras.

The test classes come from the installed wheel (``keras/src/losses/losses_test.py``),
not a copy: each is subclassed with :class:`tests.peers.ThroughFastxent`, which
replaces ``BinaryCrossentropy``, ``CategoricalCrossentropy`` and
``SparseCategoricalCrossentropy`` (classes and functions) in
``keras.src.losses.losses``, the module the tests look them up in, and checks
that every test went through fastxent. Keras runs on its TensorFlow backend.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"
pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # Keras was imported earlier with another backend
    pytest.skip(f"Keras is already loaded with the {keras.backend.backend()} backend", allow_module_level=True)

from keras.src.losses import losses  # noqa: E402
from keras.src.losses import losses_test as peer  # noqa: E402

import fastxent.keras as fxk  # noqa: E402
from tests.peers import ThroughFastxent, with_deviations  # noqa: E402


class _Keras(ThroughFastxent):
    module = losses
    replacements = {
        "BinaryCrossentropy": fxk.BinaryCrossentropy,
        "CategoricalCrossentropy": fxk.CategoricalCrossentropy,
        "SparseCategoricalCrossentropy": fxk.SparseCategoricalCrossentropy,
        "binary_crossentropy": fxk.binary_crossentropy,
        "categorical_crossentropy": fxk.categorical_crossentropy,
        "sparse_categorical_crossentropy": fxk.sparse_categorical_crossentropy,
    }
    no_kernel_call = {
        "test_config": "a config and serialisation round trip; no loss is computed",
        "test_shape_mismatch": "Keras's shape ValueError, raised while tracing, before any kernel",
    }


_AXIS = ("expects Keras-on-TensorFlow's ValueError 'Only axis=-1 is currently supported' for axis=0; "
         "fastxent supports any class axis (the loss is the one Keras's torch backend computes)")

#: Keras tests that fail through fastxent on purpose, per class: {test: reason}.
DEVIATIONS = {
    "TestKerasSparseCategoricalCrossentropy": {
        "test_binary_segmentation_different_axis": _AXIS,
        "test_multi_class_segmentation_different_axis": _AXIS,
    },
}


@with_deviations(DEVIATIONS)
class TestKerasBinaryCrossentropy(_Keras, peer.BinaryCrossentropyTest):
    pass


@with_deviations(DEVIATIONS)
class TestKerasCategoricalCrossentropy(_Keras, peer.CategoricalCrossentropyTest):
    pass


@with_deviations(DEVIATIONS)
class TestKerasSparseCategoricalCrossentropy(_Keras, peer.SparseCategoricalCrossentropyTest):
    pass

