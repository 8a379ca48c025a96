"""Compiling the CUDA sources with NVRTC, NVIDIA's runtime compiler, without a GPU.

NVRTC is a library: it turns CUDA C into PTX (the GPU's portable assembly) and, for a real
architecture such as ``sm_90``, runs the assembler ``ptxas`` to produce the machine code
(CUBIN). It needs no GPU and no driver, so the tests use it to check that every kernel file
compiles for the GPUs we target, and :func:`compile_cubin` returns the assembler's report
(registers and shared memory per kernel) for the book. CuPy compiles the same sources with
the same compiler when the kernels are launched.

Needs the ``cuda-bindings`` and ``nvidia-cuda-nvrtc`` wheels (both in requirements.txt).
"""

from __future__ import annotations

from typing import NamedTuple

#: GPU architectures every kernel is checked for: Ampere (A100) and Hopper (H100/H200).
TARGET_ARCHITECTURES = ("sm_80", "sm_90")


class CudaCompileError(RuntimeError):
    """A CUDA source did not compile; the message holds NVRTC's log."""

    def __init__(self, name: str, arch: str, log: str):
        super().__init__(f"NVRTC could not compile {name} for {arch}:\n{log}")
        self.log = log


class CompiledKernel(NamedTuple):
    """The machine code of one source for one architecture, and the compiler's report."""

    cubin: bytes
    log: str


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - both wheels are test requirements
        raise RuntimeError(
            "compiling CUDA sources needs the cuda-bindings and nvidia-cuda-nvrtc packages "
            "(pip install cuda-bindings nvidia-cuda-nvrtc)"
        ) from exc
    return nvrtc


def _check(result, what: str):
    """NVRTC calls return ``(status, *values)``; raise on a status other than success."""
    nvrtc = _nvrtc()
    status, *values = result
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, message = nvrtc.nvrtcGetErrorString(status)
        raise RuntimeError(f"NVRTC {what} failed: {message.decode()}")
    return values[0] if len(values) == 1 else values


def compile_cubin(
    source: str, *, arch: str = "sm_90", options=(), name: str = "kernel.cu"
) -> CompiledKernel:
    """Compile CUDA C ``source`` to machine code for ``arch`` (e.g. ``"sm_80"``).

    ``options`` are extra NVRTC flags, e.g. :func:`minunet.cuda.compile_options`. The
    assembler runs verbosely, so ``.log`` lists the registers and shared memory of each
    kernel. Raises :class:`CudaCompileError` with the compiler's log when compilation fails.
    """
    nvrtc = _nvrtc()
    program = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                     "program creation")
    try:
        flags = [f"--gpu-architecture={arch}", "--ptxas-options=-v", *options]
        (status,) = nvrtc.nvrtcCompileProgram(program, len(flags), [f.encode() for f in flags])
        size = _check(nvrtc.nvrtcGetProgramLogSize(program), "log size")
        log = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(program, log), "log")
        log_text = log.rstrip(b"\0 ").decode(errors="replace")
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CudaCompileError(name, arch, log_text)
        size = _check(nvrtc.nvrtcGetCUBINSize(program), "CUBIN size")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(program, cubin), "CUBIN")
        return CompiledKernel(cubin, log_text)
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def nvrtc_version() -> tuple[int, int]:
    """``(major, minor)`` of the NVRTC library in use."""
    major, minor = _check(_nvrtc().nvrtcVersion(), "version query")
    return major, minor


__all__ = ["TARGET_ARCHITECTURES", "CompiledKernel", "CudaCompileError", "compile_cubin",
           "nvrtc_version"]
