"""The all-to-all the dispatchers use: asynchronous, differentiable, and swappable for a local copy.

``start(x, ...)`` launches ``all_to_all_single`` with ``async_op=True`` and returns a ``Pending``;
``Pending.wait()`` returns the received rows. Between the two the caller computes something else:
that is the whole of overlap. The same code runs on both backends:
  gloo (CPU)   the exchange runs on one of gloo's own threads; ``wait`` blocks this thread until
               it is done.
  NCCL (CUDA)  the exchange runs on NCCL's stream. Two stream hand-offs, both CUDA events inside
               c10d: at launch NCCL's stream waits for the current stream (so ``x`` is written
               before it is read); at ``wait`` the current stream waits for NCCL's (so nothing
               reads the output early). The host never blocks.
``Pending`` holds every tensor the collective reads or writes until ``wait``: freed earlier, the
caching allocator could hand their memory to the compute stream while NCCL still uses it. After
``wait`` the compute stream is ordered after the collective, so dropping them is safe.

Autograd: a start/wait pair is two ``Function``s sharing one ``_Handle``. In backward the order
flips: ``_Wait.backward`` launches the reverse all-to-all (splits swapped) and ``_Start.backward``
waits for it. The autograd engine runs other ready nodes in between (the expert backward of
another chunk), so the backward exchanges overlap compute too. On one engine thread the engine
runs the ready node created last first, so every rank launches and waits in the reverse of its
forward order: the same order on every rank (this needs every gradient that reaches an exchange
node on one device, as it is in the layer).

``transport = "local_copy"`` replaces the exchange by a copy of the same rows on this rank (the
first min(sent, received) rows, the rest zero-filled): the compute-only step that exposed
communication is measured against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TRANSPORTS = ("collective", "local_copy")


class Pending:
    """An all-to-all in flight: its work handle, its output and the tensors it reads, until ``wait``."""

    def __init__(self, work, out: torch.Tensor, reads: tuple[torch.Tensor, ...] = ()):
        self.work, self.out, self.reads = work, out, reads

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            # hand-off: gloo: this thread blocks until gloo's thread has finished the exchange.
            # NCCL: the current stream waits on NCCL's end-of-collective event; the host does not block.
            self.work.wait()
        self.work, self.reads = None, ()  # the collective is done with them (see the module docstring)
        return self.out


def _launch(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, transport: str) -> Pending:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    if transport == "local_copy":
        n = min(out.shape[0], x.shape[0])
        out[:n].copy_(x[:n])
        out[n:].zero_()
        return Pending(None, out)
    x = x.contiguous()
    # hand-off (CUDA): c10d makes NCCL's stream wait on the current stream before it reads x
    work = dist.all_to_all_single(out, x, output_splits, input_splits, group=group, async_op=True)
    return Pending(work, out, (x,))


class _Handle:
    """What a start/wait pair shares: the splits, and the forward's then the backward's ``Pending``."""

    def __init__(self, output_splits: list[int], input_splits: list[int], group, transport: str):
        self.output_splits, self.input_splits = output_splits, input_splits
        self.group, self.transport = group, transport
        self.pending: Pending | None = None


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle):
        ctx.handle = handle
        handle.pending = _launch(x, handle.output_splits, handle.input_splits, handle.group, handle.transport)
        return handle.pending.out

    @staticmethod
    def backward(ctx, _placeholder):
        # _Wait.backward launched the reverse exchange; its result is x's gradient
        return ctx.handle.pending.wait(), None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, handle):
        ctx.handle = handle
        handle.pending.wait()
        handle.pending = None  # breaks output -> node -> handle -> Pending.out, should backward never run
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        h = ctx.handle
        h.pending = _launch(grad_out, h.input_splits, h.output_splits, h.group, h.transport)  # reverse
        return grad_out, None  # a placeholder: _Start.backward returns the exchanged gradient


class AllToAll:
    """One differentiable all-to-all: ``start`` launches it, ``wait`` returns the received rows."""

    def __init__(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, transport: str):
        self._handle = _Handle(list(output_splits), list(input_splits), group, transport)
        self._out = _Start.apply(x, self._handle)

    def wait(self) -> torch.Tensor:
        return _Wait.apply(self._out, self._handle)


def start(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, transport="collective"):
    """Launch ``all_to_all_single`` of ``x`` (``input_splits`` rows to each rank, ``output_splits``
    from each) and return at once; ``.wait()`` gives the received rows. Without autograd it is the
    bare ``Pending`` (two autograd nodes cost tens of µs, a measurable share of a small exchange)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return AllToAll(x, output_splits, input_splits, group, transport)
    return _launch(x, output_splits, input_splits, group, transport)
