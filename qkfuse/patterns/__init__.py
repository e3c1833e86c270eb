"""Pattern families: each file holds one family's match, its conditions and its replacement.

- ``norm_rope``: per-head RMSNorm of q and k followed by RoPE (neox or interleaved, full or
  partial rotary), paired into one q+k call when they share cos/sin.
- ``rope`` (off by default): the same RoPE without a norm in front.
"""
