"""Every CUDA source compiles for the GPUs we target, checked with NVRTC (no GPU needed)."""

from __future__ import annotations

import re

import pytest

from minunet import cuda
from minunet.cuda.nvrtc import TARGET_ARCHITECTURES, CudaCompileError, compile_cubin

pytest.importorskip("cuda.bindings.nvrtc", reason="needs the cuda-bindings package")

SHARED_MEMORY_LIMIT = 48 * 1024  # static __shared__ bytes per block on every CUDA GPU


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", TARGET_ARCHITECTURES)
@pytest.mark.parametrize("file", cuda.KERNEL_FILES)
def test_kernel_file_compiles(file, arch, dtype):
    compiled = compile_cubin(cuda.source(file), arch=arch, options=cuda.compile_options(dtype),
                             name=file)
    assert compiled.cubin[:4] == b"\x7fELF"  # a CUBIN is an ELF file of GPU machine code
    # The assembler saw exactly the kernels that kernel_names() finds (and ops launches).
    entries = re.findall(r"Compiling entry function '(\w+)'", compiled.log)
    assert sorted(entries) == sorted(cuda.kernel_names(file))
    for used in re.findall(r"(\d+) bytes smem", compiled.log):
        assert int(used) <= SHARED_MEMORY_LIMIT
    assert not re.search(r"[1-9]\d* bytes spill", compiled.log), compiled.log


@pytest.mark.parametrize("file", cuda.KERNEL_FILES)
def test_kernel_file_is_plain_cxx11(file):
    compile_cubin(cuda.source(file), arch="sm_90",
                  options=("--std=c++11", *cuda.compile_options("float32")), name=file)


def test_compile_error_carries_the_compiler_log():
    broken = 'extern "C" __global__ void broken(float* y) { y[0] = undeclared_name; }'
    with pytest.raises(CudaCompileError, match="undeclared_name") as info:
        compile_cubin(broken, arch="sm_90", name="broken.cu")
    assert "broken.cu" in str(info.value) and "sm_90" in str(info.value)
    assert "error" in info.value.log


def test_sources_and_kernel_names():
    assert cuda.kernel_names("reduction.cu") == ["channel_sum"]
    assert "__syncthreads()" in cuda.source("conv2d.cu")
    with pytest.raises(ValueError, match="unknown kernel file"):
        cuda.source("missing.cu")
    with pytest.raises(TypeError, match="float32 or float64"):
        cuda.compile_options("int32")
    assert cuda.defined_constant("conv2d.cu", "TILE") == 16
    with pytest.raises(LookupError, match="no '#define MISSING"):
        cuda.defined_constant("conv2d.cu", "MISSING")
