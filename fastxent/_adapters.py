"""What the framework adapters (``fastxent.torch``, ``fastxent.jax``, ``fastxent.keras``) share.

Nothing here imports a framework.
"""

import contextlib
import threading

#: Serialises the host (Numba) calls the adapters make. JAX's and TensorFlow's
#: executors run independent callbacks on worker threads at the same time, and
#: Numba's ``workqueue`` threading layer (the one left where neither OpenMP nor
#: TBB is available) aborts the process on concurrent parallel launches. Each
#: kernel already uses every core, so serialising costs no throughput.
HOST_LOCK = threading.RLock()


def host_call(function, *args, **kwargs):
    """``function(*args, **kwargs)`` under :data:`HOST_LOCK`."""
    with HOST_LOCK:
        return function(*args, **kwargs)


@contextlib.contextmanager
def host_lock():
    """Hold :data:`HOST_LOCK` for the enclosed host calls."""
    with HOST_LOCK:
        yield
