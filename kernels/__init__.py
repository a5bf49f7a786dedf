"""The CUDA C++ sources of fastxent's GPU kernels (``*.cu``, ``*.cuh``).

Not Python code: this file only makes ``kernels/`` the data package
``fastxent.kernels`` in a wheel (see ``pyproject.toml``), where
``fastxent/backends/cuda/_build.py`` finds the sources with ``importlib.resources``.
"""
