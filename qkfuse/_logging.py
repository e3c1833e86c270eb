"""Importing this module makes the ``qkfuse`` logger one of torch's logs, so ``TORCH_LOGS="+qkfuse"``
(DEBUG: each graph before and after the pass) and
``torch._logging.set_logs(modules={"qkfuse": logging.DEBUG})`` find it."""

from __future__ import annotations

try:
    from torch._logging._internal import register_log

    register_log("qkfuse", "qkfuse")
except Exception:  # a private torch API: if it moves, qkfuse still imports and plain `logging` works
    pass
