"""Running the CUDA kernels of :mod:`minunet.cuda` on the CPU (see ``cuda_emu.h``)."""
