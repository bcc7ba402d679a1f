"""label_attention: flash attention that also returns the attention mass on each label class.

One folder for the op (as flash-linear-attention keeps one per op): the public function and its argument checks
(interface, validation), the backend registry that ``backend="auto"`` consults (backends), and one module per
backend with the same three members (NAME, unsupported, and its computation, named in backends.BACKEND_FUNCTIONS):

* reference_backend: the float64 oracle that materialises P (tests);
* torch_backend: torch SDPA for the output plus an exact, memory-light recompute of the masses (row_mass_torch);
* triton_backend: the fused Triton kernel (forward and backward);
* cuda_backend: torch SDPA plus the compiled row-mass kernels of csrc/ (extension loads abft_kernels._C);
* sink_key: attention sinks for the SDPA-based paths (torch, cuda) as one more, virtual key.

Outside this folder, code imports only what this package exports: the op and its backend queries, and the few
pieces the transformers integration, the loss and the benchmarks share with it (the argument checks, the
visibility rule `visible_keys` and its label counts, the one-hot label matrix and row gather, and the output-only
path).
"""
from .backends import BACKENDS, AUTO_ORDER, BackendChoice, backend_available, backend_status
from .extension import cuda_extension_available, cuda_extension_status
from .interface import label_attention, resolve_backend
from .masks import gather_rows, label_one_hot, visible_keys, visible_label_counts
from .sdpa import attention_output
from .validation import LabelAttentionArgs, check_integer, index_value_flags, raise_for_index_values

__all__ = [
    "AUTO_ORDER", "BACKENDS", "BackendChoice", "LabelAttentionArgs", "attention_output", "backend_available",
    "backend_status", "check_integer", "cuda_extension_available", "cuda_extension_status", "gather_rows",
    "index_value_flags", "label_attention", "label_one_hot", "raise_for_index_values", "resolve_backend",
    "visible_keys", "visible_label_counts",
]
