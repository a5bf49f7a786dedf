"""kernels/ ships in the wheel, compiles, and agrees with the loader's dtype table.

None of these needs a GPU:

* the wheel holds every ``.cu``/``.cuh`` under ``fastxent/kernels/``, and the loader of a
  non-editable install finds them through ``importlib.resources``;
* ``ci/check_kernels.sh`` compiles every instantiation of the dtype table for sm_80 and
  sm_90 (nvcc front end for both; code generation by nvcc for sm_80 and by the loader's
  NVRTC path for sm_90) where nvcc is installed, so CI compiles every kernel (``.ci/run``
  runs it; here it is the ``slow`` test);
* the dtype table names exactly the kernels the sources define.

The launches are checked in test_cuda_launches.py, the device functions and index
arithmetic on the host in test_cuda_host_*.py, the kernels themselves on the emulated
(or a real) device in test_cupy.py.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from fastxent import _config
from fastxent.backends.cuda import _build
from tests.support import KERNEL_DIR, ROOT, kernel_signatures

KERNEL_FILES = sorted(p.name for p in KERNEL_DIR.iterdir() if p.suffix in (".cu", ".cuh"))

# ----------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------

def _setuptools_is_recent():
    try:
        import setuptools
    except ImportError:
        return False
    major = int(setuptools.__version__.split(".")[0])
    return major >= 77  # PEP 639 license strings (pyproject's license = "MIT")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the project (the checkout stays free of build/)."""
    source = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    if not (source / "README.md").exists():
        (source / "README.md").write_text("fastxent\n")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fastxent", source / "fastxent", ignore=ignore)
    shutil.copytree(KERNEL_DIR, source / "kernels", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(out), "-q"]
    if _setuptools_is_recent():
        command.insert(-1, "--no-build-isolation")  # offline: build with this interpreter's setuptools
    result = subprocess.run(command, capture_output=True, text=True, cwd=source)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    wheels = sorted(out.glob("fastxent-*.whl"))
    assert wheels, f"no wheel in {out}: {list(out.iterdir())}"
    return wheels[-1]


def test_wheel_ships_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"fastxent/kernels/{name}" for name in KERNEL_FILES if f"fastxent/kernels/{name}" not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert "fastxent/kernels/__init__.py" in names
    assert "fastxent/backends/cuda/__init__.py" in names


def test_installed_wheel_loader_finds_the_kernels(wheel, tmp_path):
    """A non-editable install: the loader reads the sources from the installed package."""
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                             str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    script = (
        "import sys; from fastxent.backends.cuda import _build as m\n"
        "src = m.kernel_source('softmax_rows.cu')\n"
        "assert 'sparse_xent_rows' in src and 'struct Online' in src and '#include' not in src, src[:200]\n"
        "print(m.kernel_dir()); assert 'cupy' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(target) in result.stdout, f"loaded the kernels from {result.stdout.strip()}, not the install"


def test_source_tree_loader_inlines_includes_once():
    for filename in {f for f, _ in _build.instantiations()}:
        source = _build.kernel_source(filename)
        assert "#include" not in source
        assert source.count("namespace fx {") >= 2
        assert source.count("struct Online {") == 1, "fx_formulas.cuh inlined more than once"


def test_importing_the_backend_does_not_import_cupy():
    script = "import sys; import fastxent.backends.cuda; assert 'cupy' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc is not installed: the CUDA compile check needs the CUDA toolkit")
def test_every_kernel_instantiation_compiles():
    """bash ci/check_kernels.sh: sm_80 and sm_90 (nvcc and the loader's NVRTC path), warnings as errors."""
    result = subprocess.run(["bash", "ci/check_kernels.sh", "--nvrtc-arch", "90"], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable))
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert "check_kernels: OK" in result.stdout


# ----------------------------------------------------------------------------
# The dtype table and the sources agree
# ----------------------------------------------------------------------------


def test_dtype_table_matches_the_sources():
    signatures = kernel_signatures()
    assert set(signatures) == set(_build.KERNELS), "KERNELS and the __global__ templates in kernels/ differ"
    for kernel, (filename, kinds) in _build.KERNELS.items():
        assert signatures[kernel][0] == filename, kernel
        assert len(signatures[kernel][1]) == len(kinds), (kernel, signatures[kernel][1], kinds)
    assert len(_build.instantiations()) == len(set(_build.instantiations()))


def test_launch_bounds_reach_the_kernels_from_the_config():
    """fx_common.cuh takes its launch bounds from the -D options built from fastxent/_config.py."""
    options = _build.compile_options()
    assert f"-DFX_GROUP_BLOCK_THREADS={_config.CUDA_GROUP_BLOCK_THREADS}" in options
    assert f"-DFX_ROW_BLOCK_MAX_THREADS={_config.CUDA_ROW_BLOCK_MAX_THREADS}" in options
    assert f"-DFX_ELEMENTWISE_BLOCK_THREADS={_config.CUDA_ELEMENTWISE_BLOCK_THREADS}" in options
    header = (KERNEL_DIR / "fx_common.cuh").read_text()
    assert re.search(r"GROUP_BLOCK_THREADS\s*=\s*FX_GROUP_BLOCK_THREADS", header)
    assert not re.search(r"__launch_bounds__\(\d+\)", "".join(p.read_text() for p in KERNEL_DIR.glob("*.cu"))), (
        "a literal launch bound in kernels/*.cu: take it from the -D options")
