"""Test-suite configuration: markers not declared in pyproject.toml."""


def pytest_configure(config):
    config.addinivalue_line("markers", "emulated: runs the CUDA kernels on the emulated device of tests/emu")
