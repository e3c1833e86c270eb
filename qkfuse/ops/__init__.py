"""Custom-op contracts (torch.library namespace ``qkfuse``) and their fake impls."""

from .norm_rope import norm_rope, qk_norm_rope, qk_norm_rope_cached  # noqa: F401  (registers the ops)
from .recipe import Recipe  # noqa: F401
