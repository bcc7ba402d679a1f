"""abft-kernels: label-class attention masses for Attention Behavior Fine-Tuning, without N x N memory."""
from ._extension import cuda_extension_available, cuda_extension_status
from .label_attention import BACKENDS, backend_available, label_attention, resolve_backend
from .loss import ABFTLossInfo, PIDController, abft_loss
from .hf.registration import register_when_transformers_loads

__version__ = "0.1.0"

# attn_implementation="abft" for transformers models, registered without importing transformers here.
register_when_transformers_loads()

__all__ = [
    "ABFTLossInfo", "BACKENDS", "PIDController", "abft_loss", "backend_available", "cuda_extension_available",
    "cuda_extension_status", "label_attention", "resolve_backend", "__version__",
]
