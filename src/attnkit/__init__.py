"""attnkit: every common self-attention variant behind one PyTorch API.

Layout (B, H, N, D); bool masks True = may attend; causal is bottom-right aligned; a query row
with no allowed key gives zeros (never NaN); default scale 1/sqrt(D).
"""

from . import biases, masks
from .dispatch import NoBackendError
from .functional import attention, which_backend

__version__ = "0.1.0"

__all__ = ["attention", "which_backend", "masks", "biases", "NoBackendError", "__version__"]
