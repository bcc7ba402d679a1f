"""abft-kernels: label-class attention masses for Attention Behavior Fine-Tuning, without N x N memory."""
from .hf.registration import register_when_transformers_loads
from .loss import ABFTLossInfo, PIDController, abft_loss
from .ops.label_attention import (BACKENDS, BackendChoice, backend_available, backend_status,
                                  cuda_extension_available, cuda_extension_status, label_attention, resolve_backend)

__version__ = "0.1.0"

# attn_implementation="abft" for transformers models, registered without importing transformers here.
register_when_transformers_loads()

__all__ = [
    "ABFTLossInfo", "BACKENDS", "BackendChoice", "PIDController", "abft_loss", "backend_available", "backend_status",
    "cuda_extension_available", "cuda_extension_status", "label_attention", "resolve_backend", "__version__",
]
