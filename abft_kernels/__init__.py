"""abft-kernels: label-class attention masses for Attention Behavior Fine-Tuning, without N x N memory."""
from ._extension import cuda_extension_available, cuda_extension_status
from .label_attention import BACKENDS, backend_available, label_attention, resolve_backend
from .loss import ABFTLossInfo, PIDController, abft_loss

__version__ = "0.1.0"

__all__ = [
    "ABFTLossInfo", "BACKENDS", "PIDController", "abft_loss", "backend_available", "cuda_extension_available",
    "cuda_extension_status", "label_attention", "resolve_backend", "__version__",
]
