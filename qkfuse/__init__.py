"""qkfuse: fuse QK-norm and RoPE in torch.compile graphs.

    torch.compile(model, backend="qkfuse")      # Inductor + the qkfuse post-grad pass
    qkfuse.optimize(hf_model)                    # regional compile of an unmodified HF model
    @qkfuse.fuse                                 # an attention class, instance or function
    qkfuse.explain(model, *inputs)               # what was fused, what was not and why
"""

from . import ops  # noqa: F401  (registers the qkfuse:: custom ops)
from . import _logging  # noqa: F401  (registers the qkfuse logger with TORCH_LOGS)
from .backend import fuse, optimize, qkfuse_backend, register
from .explain import Report, explain
from .functional import norm_rope, qk_norm_rope
from .options import Options
from .passes.manager import QKFusePass, pass_

__version__ = "0.1.0"

__all__ = [
    "Options", "QKFusePass", "Report", "explain", "fuse", "norm_rope", "optimize", "pass_", "qk_norm_rope",
    "qkfuse_backend", "register", "__version__",
]
