"""The batch split across CPU threads: data parallelism for a network on NumPy arrays.

BLAS spreads each matrix product over all of its threads, but the work between the
products (im2col's copies, the flat arrays of the shifted products, the ReLU, the max-pool,
the concatenations) is NumPy's, and NumPy runs it on one thread. On two cores that work
leaves one core idle for a third of a U-Net's training step. Splitting the *batch* instead
keeps every core busy all the time: each thread runs forward and backward on its share of
the images, every product on one BLAS thread, and the weight gradients of the shares are
summed at the end. Forward and backward of a depth-5, base-32 'same' U-Net on 4x128x128
images, on two cores: 553 ms with the products on two threads, 450 ms with two halves of the
batch on one thread each.

The shares give exactly the network's results, up to the order of the floating-point sums,
as long as each image is computed on its own: not for BatchNorm in training mode (its
statistics are the whole batch's) nor for dropout (its masks come from one generator).
There, and for CuPy arrays (the GPU is already parallel), :class:`BatchSplit` runs the
network as it is.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from minunet.functional.threads import run_at_once, runs_by_size, share_count, split
from minunet.nn import BatchNorm2d, Dropout, Module


class BatchSplit:
    """Runs ``net``'s forward and backward passes on shares of the batch, one thread each.

    ``threads``: how many shares at most (``None``: as many as NumPy's BLAS has threads).
    Use it as the network itself: ``forward(x)``, then ``backward(grad_logits)``, which
    adds every parameter's gradient into ``net``'s ``.grad``, as ``net.backward`` does, and
    returns dL/dx; ``zero_grad()`` and ``parameters()`` are ``net``'s.

    The first share runs on ``net`` in the calling thread; each further share on a *replica*:
    a copy of ``net`` that shares its weights and keeps its own caches and gradients (the
    memory of one more set of gradients per replica, made at the first split).
    """

    def __init__(self, net: Module, threads: int | None = None):
        if threads is not None and (not isinstance(threads, (int, np.integer))
                                    or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive int or None (as many as BLAS "
                             f"uses), got {threads!r}")
        self.net = net
        self.threads = threads
        self._replicas: list[Module] = []
        self._shares: list[slice] | None = None  # the split of the last forward pass

    # --- what the network offers --------------------------------------------------------------
    def zero_grad(self) -> None:
        self.net.zero_grad()

    def parameters(self):
        return self.net.parameters()

    # --- the split ----------------------------------------------------------------------------
    def _split(self, x) -> list[slice] | None:
        """The shares of the batch (contiguous runs of images), or None to run unsplit."""
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            return None  # the network's own checks say what is wrong with it
        count = min(self.threads or share_count(), x.shape[0])
        per_image = not any(
            module.training and (isinstance(module, BatchNorm2d)
                                 or isinstance(module, Dropout) and module.p > 0)
            for module in self.net.modules()
        )
        if count < 2 or not per_image:
            return None
        return split(x.shape[0], count)

    def _networks(self, count: int) -> list[Module]:
        """``net`` and ``count - 1`` replicas, each replica pointed at ``net``'s current
        weights, buffers and modes (they may have been replaced since the last call)."""
        while len(self._replicas) < count - 1:
            self._replicas.append(self._replica())
        for replica in self._replicas[: count - 1]:
            for mine, theirs in zip(replica.modules(), self.net.modules(), strict=True):
                mine.training = theirs.training
                for name in mine._buffer_names:
                    setattr(mine, name, getattr(theirs, name))
            for mine, theirs in zip(replica.parameters(), self.net.parameters(), strict=True):
                mine.data = theirs.data
        return [self.net, *self._replicas[: count - 1]]

    def _replica(self) -> Module:
        """A deep copy of ``net`` that shares its arrays (weights, buffers, caches) instead of
        copying them, then forgets the caches; its gradients are arrays of its own."""
        shared = {}
        for module in self.net.modules():
            for value in vars(module).values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(item, np.ndarray):
                        shared[id(item)] = item
        for p in self.net.parameters():
            shared.pop(id(p.grad), None)
        replica = copy.deepcopy(self.net, memo=shared)
        for module in replica.modules():
            module._clear_cache()
        return replica

    # --- forward and backward -----------------------------------------------------------------
    def forward(self, x):
        """x (N, C, H, W) -> the network's output for it, one share of N per thread."""
        self._shares = shares = self._split(x)
        if shares is None:
            return self.net.forward(x)
        networks = self._networks(len(shares))
        outputs = run_at_once([lambda n=n, s=s: n.forward(x[s])
                             for n, s in zip(networks, shares, strict=True)])
        return np.concatenate(outputs)

    def backward(self, grad_out, input_gradient: bool = True):
        """dL/d(output) -> dL/dx (None with ``input_gradient=False``, as ``net.backward``);
        the weight gradients of all shares are added into ``net``'s."""
        shares, self._shares = self._shares, None
        if shares is None:
            return self.net.backward(grad_out, input_gradient=input_gradient)
        if not isinstance(grad_out, np.ndarray) or grad_out.shape[:1] != (shares[-1].stop,):
            raise ValueError(f"grad_out must be an array for the {shares[-1].stop} images of the "
                             f"last forward pass, got {getattr(grad_out, 'shape', grad_out)}")
        networks = self._networks(len(shares))

        def replica_backward(replica, share):
            replica.zero_grad()
            return replica.backward(grad_out[share], input_gradient=input_gradient)

        tasks = [lambda: self.net.backward(grad_out[shares[0]], input_gradient=input_gradient)]
        tasks += [lambda n=n, s=s: replica_backward(n, s)
                  for n, s in zip(networks[1:], shares[1:], strict=True)]
        grad_x_of_shares = run_at_once(tasks)
        self._sum_gradients(networks)
        return np.concatenate(grad_x_of_shares) if input_gradient else None

    def _sum_gradients(self, networks) -> None:
        """Add the replicas' gradients into ``net``'s, the parameters dealt out to the
        threads in runs of about equal size (each addition a pass over memory)."""
        columns = list(zip(*(n.parameters() for n in networks), strict=True))

        def add(run):
            for main, *replicas in columns[run]:
                for replica in replicas:
                    main.grad += replica.grad

        runs = runs_by_size((column[0].grad.size for column in columns), len(networks))
        run_at_once(functools.partial(add, run) for run in runs)
