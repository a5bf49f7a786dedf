"""Running the frameworks' own tests through fastxent: call counters and deviations.

The peer suites (optax's and Keras's installed test modules, PyTorch's OpInfo
and ModuleInfo sample inputs) run with the framework's names replaced by
fastxent's adapters. Two counters prove the routing of every test:

* ``entries``: calls of the replaced framework names (the adapter was called);
* ``kernels``: calls of fastxent's own functions (``fastxent.sparse_softmax_cross_entropy``
  and the rest, which every adapter reaches through the ``fastxent`` package), so
  the value came from fastxent and not from a delegation to the framework.

A deviation is a peer test that fails on purpose; each is listed with its reason
(and in the README's adapter section) and skipped with that reason, and nothing
else is skipped.
"""

import collections
import functools
import threading
import unittest
from unittest import mock

import fastxent

#: fastxent's public functions the adapters call (host kernels under JAX and TensorFlow callbacks).
KERNEL_FUNCTIONS = (
    "sparse_softmax_cross_entropy",
    "softmax_cross_entropy",
    "sigmoid_cross_entropy",
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "sparse_categorical_cross_entropy",
    "softmax",
    "log_softmax",
)


class Routing:
    """Counts calls of the replaced framework names and of fastxent's functions."""

    def __init__(self):
        self.entries = collections.Counter()
        self.kernels = collections.Counter()
        self._lock = threading.Lock()  # JAX and TensorFlow call back on their own threads

    def counting(self, counter, name, function):
        @functools.wraps(function)
        def counted(*args, **kwargs):
            with self._lock:
                counter[name] += 1
            return function(*args, **kwargs)

        return counted

    def entry(self, name, function):
        """``function`` counted as a call of the framework name ``name``."""
        return self.counting(self.entries, name, function)

    def kernel_patches(self):
        """``mock.patch.object`` patchers counting fastxent's functions."""
        return [mock.patch.object(fastxent, name, self.counting(self.kernels, name, getattr(fastxent, name)))
                for name in KERNEL_FUNCTIONS]

    def summary(self):
        return f"{sum(self.entries.values())} adapter calls, {sum(self.kernels.values())} fastxent calls"


class ThroughFastxent:
    """Mixin for a peer ``unittest.TestCase``: the framework's names replaced, calls counted.

    Subclasses set ``module`` (where the peer test looks the names up),
    ``replacements`` ({name: fastxent's function or class}) and
    ``no_kernel_call`` ({test name: reason}) for tests that call the adapter but
    legitimately run no kernel (a config round trip, an error raised while tracing).
    Classes are replaced as themselves (so that ``isinstance`` and serialisation
    see fastxent's class) and counted through their ``__init__``.
    """

    module = None
    replacements = {}
    no_kernel_call = {}
    #: Every test's counters, for the report: {test id: Routing}.
    routed = {}

    def setUp(self):
        super().setUp()
        routing = self.routing = Routing()
        patchers = routing.kernel_patches()
        for name, replacement in self.replacements.items():
            if isinstance(replacement, type):
                patchers.append(mock.patch.object(self.module, name, replacement))
                patchers.append(mock.patch.object(replacement, "__init__",
                                                  routing.entry(name, replacement.__init__)))
            else:
                patchers.append(mock.patch.object(self.module, name, routing.entry(name, replacement)))
        for patcher in patchers:
            patcher.start()
            self.addCleanup(patcher.stop)
        ThroughFastxent.routed[self.id()] = routing

    def tearDown(self):
        name = self._testMethodName
        assert self.routing.entries, f"{self.id()} never called fastxent's adapter ({self.routing.summary()})"
        if name not in self.no_kernel_call:
            assert self.routing.kernels, f"{self.id()} ran no fastxent kernel ({self.routing.summary()})"
        super().tearDown()


def with_deviations(deviations):
    """Class decorator: each test that ``deviations[cls.__name__]`` ({test name: reason})
    names is skipped with its reason; a name that is not a test of the class is an error."""
    def apply(cls):
        for name, reason in deviations.get(cls.__name__, {}).items():
            if not hasattr(cls, name):
                raise AttributeError(f"{cls.__name__} has no test {name!r}: the deviation list is stale")
            setattr(cls, name, unittest.skip(f"fastxent deviation: {reason}")(getattr(cls, name)))
        return cls

    return apply
