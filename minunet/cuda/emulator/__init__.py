"""Run the CUDA kernels on the CPU: compile them with g++ and ``cuda_emu.h``, launch from Python.

:class:`EmulatedRunner` stands in for :class:`minunet.cuda.ops.CupyRunner`: inside
``with launching_on(runner):`` (or with ``minunet.cuda.ops.gpu_runner`` replaced by pytest's
``monkeypatch`` in the tests), the tests and the book run the SAME host code (sizes, grids,
argument lists, the composition of passes) and the SAME kernels as on a GPU, with NumPy
arrays standing in for GPU memory. It needs only g++ (:func:`compiler`), no GPU and no
CuPy. ``README.md`` next to this file explains how the emulation works.

Two things a GPU would punish are checked on every launch:

* every argument must have the exact C type of its parameter (``numpy.int32`` for ``int``,
  the array's float type for ``scalar_t``): CuPy passes a Python ``int`` as a 64-bit integer,
  which a kernel taking ``int`` would misread;
* arrays made by the runner are surrounded by guard bytes that read as NaN (and as -1 for
  int32) and are checked after every launch, so a kernel that writes past an array fails and
  one that reads past it returns NaN. New arrays start as NaN too, so an element that a
  kernel forgets to write shows up.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import subprocess
import weakref
from pathlib import Path

import numpy as np

from minunet import cuda
from minunet.cuda import ops

HEADER = Path(__file__).resolve().parent / "cuda_emu.h"
GUARD_BYTES = 64
GUARD_FILL = 0xFF  # all-ones bytes: NaN as float32/float64, -1 as int32
COMPILE_FLAGS = ("-std=c++20", "-O1", "-pthread", "-shared", "-fPIC")

_LIBRARIES: dict[tuple, ctypes.CDLL] = {}  # compiled once per process (see EmulatedRunner.library)

_C_TYPES = {"i": (np.int32, ctypes.c_int), "f": (np.float32, ctypes.c_float),
            "d": (np.float64, ctypes.c_double)}


def compiler() -> str | None:
    """Path of g++, or ``None`` when it is not installed."""
    return shutil.which("g++")


class EmulationError(RuntimeError):
    """A launch that a GPU would refuse, or a kernel that misbehaved (the message says which)."""


class EmulatedKernel:
    """One kernel of a compiled file, called like ``cupy.RawKernel``: ``k(grid, block, args)``."""

    def __init__(self, library: ctypes.CDLL, name: str, after_launch):
        self.name = name
        self._launch = getattr(library, f"emu_launch_{name}")
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 2 + [
            ctypes.POINTER(ctypes.c_void_p)
        ]
        self._launch.restype = ctypes.c_int
        signature = getattr(library, f"emu_signature_{name}")
        signature.restype = ctypes.c_char_p
        self.signature = signature().decode()  # one letter per parameter: p, i, f or d
        self._error_message = library.emu_error_message
        self._error_message.restype = ctypes.c_char_p
        self._after_launch = after_launch

    def _pack(self, args) -> list:
        """One ctypes value per argument, after checking it against the kernel's signature."""
        if len(args) != len(self.signature):
            raise EmulationError(
                f"{self.name} takes {len(self.signature)} arguments, got {len(args)}"
            )
        values = []
        for position, (code, arg) in enumerate(zip(self.signature, args, strict=True)):
            if code == "p":
                if not isinstance(arg, np.ndarray) or not arg.flags.c_contiguous:
                    raise EmulationError(
                        f"{self.name}: argument {position} must be a C-contiguous array, "
                        f"got {type(arg).__name__}"
                    )
                values.append(ctypes.c_void_p(arg.ctypes.data))
                continue
            numpy_type, c_type = _C_TYPES[code]
            if type(arg) is not numpy_type:
                raise EmulationError(
                    f"{self.name}: argument {position} must be numpy.{numpy_type.__name__}, "
                    f"got {type(arg).__name__} (a GPU would misread it)"
                )
            values.append(c_type(arg))
        return values

    def __call__(self, grid, block, args) -> None:
        grid = (*grid, 1, 1)[:3]
        block = (*block, 1, 1)[:3]
        values = self._pack(args)
        pointers = (ctypes.c_void_p * len(values))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        )
        status = self._launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), pointers)
        if status != 0:
            raise EmulationError(f"{self.name}: {self._error_message().decode()}")
        self._after_launch(self.name)


def build(sources: dict[str, str], dtype, directory: Path, defines=()) -> Path:
    """Compile CUDA ``sources`` (file name -> text) for ``dtype`` into one shared library.

    The library goes to ``directory``; ``defines`` are extra preprocessor names (e.g.
    ``"MINUNET_OMIT_SYNC"``). One translation unit holds all sources (they are self-contained
    and share no names), which compiles much faster than one library per file. Raises
    :class:`EmulationError` with g++'s messages if compilation fails.
    """
    scalar = cuda.scalar_type(dtype)
    stem = "_".join(["kernels", scalar, *defines])
    lines = [f'#include "{HEADER}"']
    for file, text in sources.items():
        copy = directory / file
        copy.write_text(text, encoding="utf-8")
        lines.append(f'#include "{copy}"')
    lines += [f"EMU_EXPORT_KERNEL({name})"
              for text in sources.values() for name in cuda.find_kernel_names(text)]
    harness = directory / f"{stem}.cpp"
    harness.write_text("\n".join(lines) + "\n", encoding="utf-8")
    library = directory / f"lib{stem}.so"
    command = [compiler() or "g++", *COMPILE_FLAGS, f"-DMINUNET_SCALAR={scalar}",
               *[f"-D{d}" for d in defines], str(harness), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EmulationError(f"g++ could not compile {', '.join(sources)}:\n{result.stderr}")
    return library


class EmulatedRunner:
    """Executes the kernels of :mod:`minunet.cuda.ops` on the CPU.

    ``sources`` maps file names to CUDA text (by default every file of :mod:`minunet.cuda`);
    they are built on first use, into one library per dtype in ``directory`` (which must be
    private to this runner), with ``defines`` given to the compiler. ``launched`` counts the
    launches of each kernel.
    """

    xp = np

    def __init__(self, directory: Path, defines=(), sources=None):
        self.directory = Path(directory)
        self.defines = tuple(defines)
        self.sources = sources or {file: cuda.source(file) for file in cuda.KERNEL_FILES}
        self.launched: dict[str, int] = {}
        self._kernels: dict[tuple, EmulatedKernel] = {}
        self._guarded: list[weakref.ref] = []

    def library(self, dtype) -> ctypes.CDLL:
        """The compiled kernels for ``dtype``: built on the first call, and shared with every
        runner of this process that has the same sources and defines."""
        key = (tuple(self.sources.items()), self.defines, np.dtype(dtype).name)
        if key not in _LIBRARIES:
            path = build(self.sources, dtype, self.directory, self.defines)
            _LIBRARIES[key] = ctypes.CDLL(str(path))
        return _LIBRARIES[key]

    def kernel(self, file: str, name: str, dtype) -> EmulatedKernel:
        if file not in self.sources:
            raise EmulationError(f"{file} is not among the sources of this runner")
        key = (name, np.dtype(dtype).name)
        if key not in self._kernels:
            self._kernels[key] = EmulatedKernel(self.library(dtype), name, self._after_launch)
        return self._kernels[key]

    def empty(self, shape, dtype) -> np.ndarray:
        """A new array with NaN (or -1) in every element and in guard bytes on both sides."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        memory = np.full(nbytes + 2 * GUARD_BYTES, GUARD_FILL, dtype=np.uint8)
        self._guarded.append(weakref.ref(memory))
        return memory[GUARD_BYTES:GUARD_BYTES + nbytes].view(dtype).reshape(shape)

    def zeros(self, shape, dtype) -> np.ndarray:
        array = self.empty(shape, dtype)
        array[...] = 0
        return array

    def contiguous(self, x) -> np.ndarray:
        """``x`` itself if the runner made it, else a guarded copy (like a host-to-GPU copy)."""
        owner = x.base if isinstance(x, np.ndarray) else None  # NumPy views name the owner
        if owner is not None and x.flags.c_contiguous and \
                any(ref() is owner for ref in self._guarded):
            return x
        copy = self.empty(np.shape(x), np.asarray(x).dtype)
        copy[...] = x
        return copy

    def _after_launch(self, name: str) -> None:
        self.launched[name] = self.launched.get(name, 0) + 1
        alive = [ref for ref in self._guarded if ref() is not None]
        self._guarded = alive
        for ref in alive:
            memory = ref()
            if memory is None:
                continue
            guards = np.concatenate([memory[:GUARD_BYTES], memory[-GUARD_BYTES:]])
            if (guards != GUARD_FILL).any():
                raise EmulationError(f"{name} wrote outside an array (a guard byte changed)")


@contextlib.contextmanager
def launching_on(runner: EmulatedRunner):
    """Within the block, :mod:`minunet.cuda.ops` launches its kernels on ``runner`` (for
    scripts and the book; tests use pytest's ``monkeypatch`` the same way)."""
    saved = ops.gpu_runner
    ops.gpu_runner = lambda: runner
    try:
        yield runner
    finally:
        ops.gpu_runner = saved
