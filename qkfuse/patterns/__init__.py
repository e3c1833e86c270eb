"""Pattern families: what the pass fuses, read from the post-grad graph as plain data.

Reusable matchers, each on its own: ``rope.py`` (RoPE output), ``rms_norm.py`` (RMSNorm or LayerNorm output),
``kv_cache.py`` (the KV-cache write after a k site), all reading nodes through ``canon.py``. A
family (the ``Family`` protocol, ``family.py``) composes them in a few lines:

- ``norm_rope``: per-head RMSNorm or LayerNorm of q and k followed by RoPE (neox or interleaved,
  full or partial rotary), paired into one q+k call when they share cos/sin.
- ``norm_cat_rope``: norms of q and k parts (Flux's text and image tokens) concatenated, then one
  RoPE: each part normed and rotated into its rows of the one output.
- ``norm_slice_rope``: one q/k norm whose rows are partly rotated (HunyuanVideo's image tokens before
  its text ones, CogView4's slice assignment): each part normed, and rotated or not, into its rows.
- ``rope_norm``: RoPE first, then a per-head norm of its output (Llama4, nanochat, HunYuan).
- ``rope`` (opt-in): the same RoPE without a norm in front.
- ``norm`` (opt-in): per-head RMSNorms of q and k with no RoPE after them, one call for the pair.

FAMILIES is the order in which the pass tries the families that propose one candidate node.
"""

from .family import Family, MatchContext, Refused, Site
from .norm import NormOnly
from .norm_rope import NormCatRope, NormRope, RopeOnly
from .norm_slice_rope import NormSliceRope
from .rope_norm import RopeNorm

FAMILIES: tuple[Family, ...] = (NormRope(), NormCatRope(), NormSliceRope(), RopeNorm(), RopeOnly(), NormOnly())
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}

__all__ = ["BY_NAME", "FAMILIES", "Family", "MatchContext", "Refused", "Site"]
