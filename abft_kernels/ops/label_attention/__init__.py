"""label_attention: flash attention that also returns the attention mass on each label class.

One folder for the op (as flash-linear-attention keeps one per op): the public function and its argument checks
(interface, validation), the backend registry that ``backend="auto"`` consults (backends), and one module per
backend with the same three members (NAME, unsupported, label_attention):

* reference_backend: the float64 oracle that materialises P (tests);
* torch_backend: torch SDPA for the output plus an exact, memory-light recompute of the masses (row_mass_torch);
* triton_backend: the fused Triton kernel (forward and backward);
* cuda_backend: torch SDPA plus the compiled row-mass kernels of csrc/ (extension loads abft_kernels._C);
* sink_key: attention sinks for the SDPA-based paths (torch, cuda) as one more, virtual key.
"""
from .backends import BACKENDS, AUTO_ORDER, BackendChoice, backend_available, backend_status
from .extension import cuda_extension_available, cuda_extension_status
from .interface import label_attention, resolve_backend
from .validation import LabelAttentionArgs

__all__ = [
    "AUTO_ORDER", "BACKENDS", "BackendChoice", "LabelAttentionArgs", "backend_available", "backend_status",
    "cuda_extension_available", "cuda_extension_status", "label_attention", "resolve_backend",
]
