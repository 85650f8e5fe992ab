"""An op census that finds host-device synchronisations of CUDA code by running it on a CPU.

`torch.cuda.set_sync_debug_mode` only works on a GPU, and patching `Tensor.item` and friends misses the syncs
inside ATen ops (bincount reads its input's min and max back to size its output). SyncCensus is a
TorchDispatchMode: it records every aten op dispatched while it is active, with the smallvit function that called
it, and flags the ops that synchronise with the host on CUDA (SYNCING), so a CPU test of the CUDA code path can
assert that a whole augmentation chunk or a training step has none. Host reads that dispatch nothing on a CPU
tensor (`tolist`, `numpy`, `cpu`) are counted by wrapping those Tensor methods while the census runs.

Written by hand: PyTorch has no CPU-side list of its syncing ops. SYNCING was collected from ATen's CUDA sources
(ops whose output size depends on the data, or that check values on the host) and pytorch/pytorch#108968.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten op name (without overload) -> why it waits for the device on CUDA.
SYNCING = {
    "_local_scalar_dense": "a value read back to the host (.item(), bool(), int(), float(), indexing by a 0-d tensor)",
    "bincount": "reads the input's min and max back to size the output",
    "histc": "reads min and max back when min == max (the default)",
    "nonzero": "output size depends on the data",
    "argwhere": "nonzero",
    "masked_select": "output size depends on the data (nonzero)",
    "unique": "output size depends on the data",
    "_unique": "output size depends on the data",
    "_unique2": "output size depends on the data",
    "unique_dim": "output size depends on the data",
    "unique_consecutive": "output size depends on the data",
    "unique_dim_consecutive": "output size depends on the data",
    "equal": "returns a Python bool",
    "is_nonzero": "returns a Python bool",
    "allclose": "returns a Python bool",
    "nanmedian": "reads a count back",
    "multinomial": "checks its input on the host (pytorch/pytorch#108968)",
    "tensor_split": "tensor indices are read on the host",
    "_linalg_check_errors": "reads the LAPACK info codes back",
}
# Ops that sync only with some arguments: name -> (predicate(overload, args, kwargs), why).
def _bool_index(overload: str, args, kwargs) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


_MASK = "a boolean mask index is turned into indices with nonzero"
CONDITIONAL = {
    # repeat_interleave(x, tensor_repeats) reaches the dispatcher as repeat_interleave.Tensor(repeats, output_size)
    "repeat_interleave": (lambda overload, args, kwargs: overload == "Tensor" and kwargs.get("output_size") is None,
                          "tensor repeats without output_size: the output size is read back"),
    "index": (_bool_index, _MASK),
    "index_put": (_bool_index, _MASK),
    "index_put_": (_bool_index, _MASK),
    "_index_put_impl_": (_bool_index, _MASK),
}
# Tensor methods that read data on the host without dispatching anything for a CPU tensor.
HOST_READS = ("tolist", "numpy", "cpu")
_TORCH_DIR = str(Path(torch.__file__).parent)


def _caller() -> str:
    """file:function of the innermost frame outside torch (and this file), e.g. 'autoaugment.py:_point_lut'."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename == __file__):
        f = f.f_back
    return "?" if f is None else f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}"


class SyncCensus(TorchDispatchMode):
    """Record every aten op run inside `with SyncCensus() as c:`; c.syncs lists the ones that sync on CUDA.

    c.ops: Counter of op names ('aten::add.Tensor'); c.syncs: Counter of (op, caller, reason); c.created: Counter of
    callers that turned host data into a tensor (torch.tensor, from_numpy: a host-to-device copy on CUDA, which blocks
    unless it is non_blocking). c.total: the number of ops, a proxy for kernel launches on a GPU.
    """

    def __init__(self, host_tensors=()):
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.created: Counter = Counter()
        self.host_reads: Counter = Counter()  # flagged ops on host_tensors only: free on a GPU run too
        # Tensors that stay in host memory in the GPU run as well (timm keeps its optimisers' step counters there).
        self._host = {t.data_ptr() for t in host_tensors}
        self._saved = {}

    def _on_host(self, args) -> bool:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return bool(tensors) and all(t.data_ptr() in self._host for t in tensors)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        overload = func._overloadname
        self.ops[f"aten::{name}" if overload in ("", "default") else f"aten::{name}.{overload}"] += 1
        why = SYNCING.get(name)
        if why is None and name in CONDITIONAL and CONDITIONAL[name][0](overload, args, kwargs):
            why = CONDITIONAL[name][1]
        if why is not None:
            (self.host_reads if self._on_host(args) else self.syncs)[(name, _caller(), why)] += 1
        if name == "lift_fresh":
            self.created[_caller()] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for meth in HOST_READS:
            orig = getattr(torch.Tensor, meth)
            self._saved[meth] = orig

            def counted(t, *a, _orig=orig, _meth=meth, **k):
                self.syncs[(f"Tensor.{_meth}", _caller(), "copies the data to the host")] += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, meth, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for meth, orig in self._saved.items():
            setattr(torch.Tensor, meth, orig)
        self._saved.clear()
        return super().__exit__(*exc)

    def report(self) -> str:
        """One line per syncing call site, for assertion messages."""
        return "; ".join(f"{op} x{n} in {where} ({why})" for (op, where, why), n in self.syncs.items()) or "none"
