"""Triton kernel: RMSNorm + RoPE of q and k in one launch.

Layout model. The launcher views each of q and k as [outer, inner, heads, head_dim] with arbitrary
strides (last dim contiguous): "tokens" are (outer, inner) pairs, shared by q and k, and the
per-token cos/sin row is shared by all heads. The grid is (token blocks, q head blocks + k head
blocks): one program normalises and rotates a [BLOCK_T, BLOCK_H, head_dim] tile, loading each
element once. A row is split into the two rotated halves (a, b) and the pass-through tail:

    neox:         a = x[:rd/2],  b = x[rd/2:rd]           out_a = a*cos_a - b*sin_a
    interleaved:  a = x[0:rd:2], b = x[1:rd:2]            out_b = b*cos_b + a*sin_b
    tail:         x[rd:]                                   copied (after the norm)

so the partner of every rotated element is in registers and no element is read twice. With
HALF_TABLE (one cos/sin entry per pair, Recipe.half_table) cos_a = cos_b = cos[i], sin_a = sin_b = sin[i].
X_PAIRS: x (and a norm's weight and bias) is read as interleaved pairs; with INTERLEAVED off
(Recipe.deinterleave_input, DeepSeek's apply_rotary_pos_emb_interleave) the pairs a = x[0:rd:2],
b = x[1:rd:2] are rotated with neox cos/sin and stored as neox halves (out[i], out[i + rd/2]).
Rounding follows qkfuse/ops/recipe.py: float32 math, rounded exactly where the graph rounds.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round(x, CODE: tl.constexpr):
    # Round a float32 value to the dtype named by CODE (0 f32, 1 f16, 2 bf16) and back.
    if CODE == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif CODE == 2:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


@triton.jit
def _scale(x, r, w, bias, CAST_BEFORE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
           X_CODE: tl.constexpr, Y_CODE: tl.constexpr):
    n = x * r
    if HAS_WEIGHT:
        if CAST_BEFORE:
            n = _round(n, X_CODE)
        n = n * w
    if HAS_BIAS:  # LayerNorm's bias, added in float32 before the one rounding
        n = n + bias
    return _round(n, Y_CODE)


@triton.jit
def _weight(w_ptr, w_row, w_ok, cols, n_cols, WEIGHT_OFFSET: tl.constexpr, ACROSS: tl.constexpr):
    """The weight (+ offset, float32) at `cols` as [rows, cols]: one row that every head shares
    (per-head norm), or each head's own slice of a [heads * head_dim] weight (ACROSS: head h's row
    starts at w_row[h], w_ok masks the padded heads; also an [H, D] weight with a row per head).
    LayerNorm's bias is loaded the same way (offset 0)."""
    if ACROSS:
        w = tl.load(w_ptr + w_row + cols[None, :], mask=w_ok & (cols < n_cols)[None, :], other=0.0)
    else:
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0)[None, :]
    return w.to(tl.float32) + WEIGHT_OFFSET


@triton.jit
def _rope_pair(a, b, ca, sa, cb, sb, R_CODE: tl.constexpr):
    oa = _round(_round(a * ca, R_CODE) + _round(-b * sa, R_CODE), R_CODE)
    ob = _round(_round(b * cb, R_CODE) + _round(a * sb, R_CODE), R_CODE)
    return oa, ob


@triton.jit
def _rows(pid_t, hb, n_tokens, n_inner, n_heads, x_so, x_si, x_sh, o_so, o_si, o_sh,
          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row offsets of a [BLOCK_T, BLOCK_H] tile of (token, head) rows in x and in the output."""
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    h = (hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    t_outer = (t // n_inner).to(tl.int64)
    t_inner = (t % n_inner).to(tl.int64)
    t_ok = (t < n_tokens)[:, None, None]
    row_mask = t_ok & (h < n_heads)[None, :, None]
    x_row = (t_outer * x_so + t_inner * x_si)[:, None, None] + (h * x_sh)[None, :, None]
    o_row = (t_outer * o_so + t_inner * o_si)[:, None, None] + (h * o_sh)[None, :, None]
    return t, t_outer, t_inner, t_ok, row_mask, x_row, o_row


@triton.jit
def _seq_coord(t_outer, t_inner, POS_AXIS: tl.constexpr):
    # a cache's sequence coordinate of each token: the outer or inner token index, or 0 (size-1 sequence)
    if POS_AXIS == 0:
        seq = t_outer
    elif POS_AXIS == 1:
        seq = t_inner
    else:
        seq = t_outer * 0
    return seq


@triton.jit
def _cache_row(pos, o_seq, cache_len):
    """(row offset, in range) of cache positions `pos` (negative = from the end): rows outside the
    cache are not stored."""
    pos = pos.to(tl.int64)
    pos = tl.where(pos < 0, pos + cache_len, pos)
    return (pos * o_seq)[:, None, None], ((pos >= 0) & (pos < cache_len))[:, None, None]


# Cache positions are loaded where they are used, not in a helper: torch's analysis of what a
# kernel writes follows every argument of a call whose result feeds a store address (a helper that
# loaded them would make the positions count as written, and Inductor would clone them).


@triton.jit
def _copy_tile(x_ptr, o_ptr, pid_t, hb, n_tokens, n_inner, n_heads, x_so, x_si, x_sh, o_so, o_si, o_sh,
               idx_ptr, idx_stride, cache_len, o_seq, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               POS_AXIS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Copy rows (v into its cache, beside k's norm+RoPE in the same launch)."""
    t, t_outer, t_inner, t_ok, row_mask, x_row, o_row = _rows(
        pid_t, hb, n_tokens, n_inner, n_heads, x_so, x_si, x_sh, o_so, o_si, o_sh, BLOCK_T, BLOCK_H)
    store_mask = row_mask
    if POS_AXIS >= 0:
        pos = tl.load(idx_ptr + _seq_coord(t_outer, t_inner, POS_AXIS) * idx_stride, mask=t < n_tokens, other=0)
        off, ok = _cache_row(pos, o_seq, cache_len)
        o_row += off
        store_mask = row_mask & ok
    d = tl.arange(0, D_PAD)[None, None, :]
    x = tl.load(x_ptr + x_row + d, mask=row_mask & (d < HEAD_DIM), other=0.0, eviction_policy="evict_first")
    tl.store(o_ptr + o_row + d, x.to(o_ptr.dtype.element_ty), mask=store_mask & (d < HEAD_DIM))


@triton.jit
def _rotate(a, b, cos_ptr, sin_ptr, c_row, s_row, c_mask, t, t_ok, t_outer, t_inner, n_tokens, c_so, c_si, s_so,
            c_sd, s_sd, ROT_DIM: tl.constexpr, HALF_PAD: tl.constexpr, R_CODE: tl.constexpr,
            INTERLEAVED: tl.constexpr, COS_PER_HEAD: tl.constexpr, ROPE_CACHE: tl.constexpr,
            HALF_TABLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NEG_SIN: tl.constexpr):
    """RoPE of the pairs (a, b): their cos/sin loaded (sin negated with NEG_SIN: nanochat's rotation
    the other way, Recipe.negate_sin), the products and sums rounded to R_CODE."""
    HALF: tl.constexpr = ROT_DIM // 2
    if ROPE_CACHE:
        # vLLM-style: cos_ptr is a [positions, rotary_dim] cache (cos of the rd/2 frequencies, then
        # their sin), sin_ptr the int positions of the tokens (token strides c_so/c_si), s_so the
        # cache's row stride. Both rotation partners use frequency i in either style.
        pos = tl.load(sin_ptr + t_outer * c_so + t_inner * c_si, mask=t < n_tokens, other=0).to(tl.int64)
        crow = (pos * s_so)[:, None, None]
        dh = tl.arange(0, HALF_PAD)[None, None, :]
        cm = t_ok & (dh < HALF)
        ca = tl.load(cos_ptr + crow + dh, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        sa = tl.load(cos_ptr + crow + HALF + dh, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        cb = ca
        sb = sa
    elif HALF_TABLE:
        # one cos/sin per pair (Recipe.half_table; last-dim strides c_sd/s_sd, e.g. Wan's
        # freqs[..., 0::2] views): both partners of pair i use entry i, in either style
        dh = tl.arange(0, HALF_PAD)[None, None, :]
        cm = c_mask & (dh < HALF)
        ca = tl.load(cos_ptr + c_row + dh * c_sd, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        sa = tl.load(sin_ptr + s_row + dh * s_sd, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        cb = ca
        sb = sa
    elif INTERLEAVED:
        dr = tl.arange(0, 2 * HALF_PAD)[None, None, :]
        cm = c_mask & (dr < ROT_DIM)
        cos = tl.load(cos_ptr + c_row + dr, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        sin = tl.load(sin_ptr + s_row + dr, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if COS_PER_HEAD:
            ca, cb = tl.split(tl.reshape(cos, [BLOCK_T, BLOCK_H, HALF_PAD, 2]))
            sa, sb = tl.split(tl.reshape(sin, [BLOCK_T, BLOCK_H, HALF_PAD, 2]))
        else:
            ca, cb = tl.split(tl.reshape(cos, [BLOCK_T, 1, HALF_PAD, 2]))
            sa, sb = tl.split(tl.reshape(sin, [BLOCK_T, 1, HALF_PAD, 2]))
    else:
        da = tl.arange(0, HALF_PAD)[None, None, :]
        cm = c_mask & (da < HALF)
        ca = tl.load(cos_ptr + c_row + da, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        cb = tl.load(cos_ptr + c_row + HALF + da, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        sa = tl.load(sin_ptr + s_row + da, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
        sb = tl.load(sin_ptr + s_row + HALF + da, mask=cm, other=0.0, eviction_policy="evict_last").to(tl.float32)
    if NEG_SIN:
        sa = -sa
        sb = -sb
    # cos/sin wider than the RoPE's dtype are rounded to it first, as the graph's .to() does
    oa, ob = _rope_pair(a, b, _round(ca, R_CODE), _round(sa, R_CODE), _round(cb, R_CODE), _round(sb, R_CODE),
                        R_CODE)
    return oa, ob


@triton.jit
def _norm_rope_tile(
    x_ptr, o_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, eps,
    pid_t, hb, n_tokens, n_inner, n_heads,
    x_so, x_si, x_sh, o_so, o_si, o_sh, c_so, c_si, c_sh, s_so, s_si, s_sh,
    idx_ptr, idx_stride, cache_len, o_seq, c_sd, s_sd,
    HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    TAIL_CHUNK: tl.constexpr, N_TAIL: tl.constexpr,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, WEIGHT_OFFSET: tl.constexpr,
    CAST_BEFORE: tl.constexpr, X_CODE: tl.constexpr, Y_CODE: tl.constexpr, R_CODE: tl.constexpr,
    INTERLEAVED: tl.constexpr, COS_PER_HEAD: tl.constexpr, ROPE_CACHE: tl.constexpr,
    POS_AXIS: tl.constexpr, ACROSS: tl.constexpr, NORM_SUM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, LAYER: tl.constexpr, HAS_BIAS: tl.constexpr, W_ROWS: tl.constexpr,
    HALF_TABLE: tl.constexpr, X_PAIRS: tl.constexpr, ROPE_FIRST: tl.constexpr, NEG_SIN: tl.constexpr,
):
    HALF: tl.constexpr = ROT_DIM // 2
    TAIL: tl.constexpr = HEAD_DIM - ROT_DIM

    t, t_outer, t_inner, t_ok, row_mask, x_row, o_row = _rows(
        pid_t, hb, n_tokens, n_inner, n_heads, x_so, x_si, x_sh, o_so, o_si, o_sh, BLOCK_T, BLOCK_H)
    store_mask = row_mask
    if POS_AXIS >= 0:  # the output is a KV cache: rows land at the tokens' positions
        pos = tl.load(idx_ptr + _seq_coord(t_outer, t_inner, POS_AXIS) * idx_stride, mask=t < n_tokens, other=0)
        off, ok = _cache_row(pos, o_seq, cache_len)
        o_row += off
        store_mask = row_mask & ok
    h = (hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    # across heads (ACROSS): the tile holds every head of its tokens; head h's weight is the
    # [h * head_dim, (h + 1) * head_dim) slice of a [heads * head_dim] weight
    w_row = (h * HEAD_DIM)[:, None]
    w_ok = (h < n_heads)[:, None]
    if COS_PER_HEAD:
        c_row = (t_outer * c_so + t_inner * c_si)[:, None, None] + (h * c_sh)[None, :, None]
        s_row = (t_outer * s_so + t_inner * s_si)[:, None, None] + (h * s_sh)[None, :, None]
        c_mask = row_mask
    else:
        c_row = (t_outer * c_so + t_inner * c_si)[:, None, None]
        s_row = (t_outer * s_so + t_inner * s_si)[:, None, None]
        c_mask = t_ok
    # The pass-through tail x[rot:] is walked in chunks as wide as a rotated half, so every tile
    # of the row has one shape (and one register layout: no shared-memory layout conversions).
    dc = tl.arange(0, TAIL_CHUNK)[None, None, :]

    # ---- pass 1: load the rotated part; sum of squares over the whole row ---------------------
    if ROT_DIM > 0:
        if X_PAIRS:  # (a, b) = (x[2i], x[2i + 1]): interleaved, or de-interleaved (DeepSeek)
            dr = tl.arange(0, 2 * HALF_PAD)[None, None, :]
            xr = tl.load(x_ptr + x_row + dr, mask=row_mask & (dr < ROT_DIM), other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            a, b = tl.split(tl.reshape(xr, [BLOCK_T, BLOCK_H, HALF_PAD, 2]))
        else:
            da = tl.arange(0, HALF_PAD)[None, None, :]
            m = row_mask & (da < HALF)
            a = tl.load(x_ptr + x_row + da, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
            b = tl.load(x_ptr + x_row + HALF + da, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if ROPE_FIRST:  # RoPE of x (as the rope dtype), rounded to x's dtype (X_CODE); the norm reads that
            a, b = _rotate(_round(a, R_CODE), _round(b, R_CODE), cos_ptr, sin_ptr, c_row, s_row, c_mask, t, t_ok,
                           t_outer, t_inner, n_tokens, c_so, c_si, s_so, c_sd, s_sd, ROT_DIM, HALF_PAD, R_CODE,
                           INTERLEAVED, COS_PER_HEAD, ROPE_CACHE, HALF_TABLE, BLOCK_T, BLOCK_H, NEG_SIN)
            a = _round(a, X_CODE)
            b = _round(b, X_CODE)
    if NORM:
        if LAYER:
            # LayerNorm: the mean first (one float32 sum over the row), then the sum of squares of
            # the centred values (the rotated part stays in registers; a chunked tail is read again)
            s1 = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
            if ROT_DIM > 0:
                s1 += tl.sum(a, axis=2) + tl.sum(b, axis=2)
            if N_TAIL == 1:
                p = tl.load(x_ptr + x_row + ROT_DIM + dc, mask=row_mask & (dc < TAIL), other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                s1 += tl.sum(p, axis=2)
            else:
                for i in tl.static_range(N_TAIL):
                    pc = tl.load(x_ptr + x_row + ROT_DIM + i * TAIL_CHUNK + dc,
                                 mask=row_mask & (dc + i * TAIL_CHUNK < TAIL), other=0.0,
                                 eviction_policy="evict_last").to(tl.float32)
                    s1 += tl.sum(pc, axis=2)
            if ACROSS:
                s1 = tl.sum(s1, axis=1)[:, None]
                mu = (s1 / (n_heads * HEAD_DIM))[:, :, None]
            else:
                mu = (s1 / HEAD_DIM)[:, :, None]
            ss = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
            if ROT_DIM > 0:  # centred; padded lanes and heads stay 0
                lane = row_mask & (tl.arange(0, HALF_PAD) < HALF)[None, None, :]
                a = tl.where(lane, a - mu, 0.0)
                b = tl.where(lane, b - mu, 0.0)
                ss += tl.sum(a * a, axis=2) + tl.sum(b * b, axis=2)
            if N_TAIL == 1:
                p = tl.where(row_mask & (dc < TAIL), p - mu, 0.0)
                ss += tl.sum(p * p, axis=2)
            else:
                for i in tl.static_range(N_TAIL):
                    pc = tl.load(x_ptr + x_row + ROT_DIM + i * TAIL_CHUNK + dc,
                                 mask=row_mask & (dc + i * TAIL_CHUNK < TAIL), other=0.0,
                                 eviction_policy="evict_last").to(tl.float32)
                    pc = tl.where(row_mask & (dc + i * TAIL_CHUNK < TAIL), pc - mu, 0.0)
                    ss += tl.sum(pc * pc, axis=2)
            if ACROSS:
                ms = tl.sum(ss, axis=1)[:, None] / (n_heads * HEAD_DIM)
            else:
                ms = ss / HEAD_DIM
            r = tl.math.rsqrt(ms + tl.cast(eps, tl.float32))[:, :, None]
        else:
            ss = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
            if ROT_DIM > 0:
                ss += tl.sum(a * a, axis=2) + tl.sum(b * b, axis=2)
            if N_TAIL == 1:
                p = tl.load(x_ptr + x_row + ROT_DIM + dc, mask=row_mask & (dc < TAIL), other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                ss += tl.sum(p * p, axis=2)
            else:
                for i in tl.static_range(N_TAIL):  # read again in pass 2 (from L1/L2)
                    pc = tl.load(x_ptr + x_row + ROT_DIM + i * TAIL_CHUNK + dc,
                                 mask=row_mask & (dc + i * TAIL_CHUNK < TAIL), other=0.0,
                                 eviction_policy="evict_last").to(tl.float32)
                    ss += tl.sum(pc * pc, axis=2)
            # Inductor passes Python floats as fp64; fp64 here would turn the whole row math fp64.
            if ACROSS:  # one mean over all heads of a token (masked heads added zeros)
                ss = tl.sum(ss, axis=1)[:, None]
            # the mean of the squares, or their sum (NORM_SUM: an L2 norm)
            if NORM_SUM:
                ms = ss
            elif ACROSS:
                ms = ss / (n_heads * HEAD_DIM)
            else:
                ms = ss / HEAD_DIM
            r = tl.math.rsqrt(ms + tl.cast(eps, tl.float32))[:, :, None]

    # ---- rotated part: norm, RoPE, store --------------------------------------------------
    out_ty = o_ptr.dtype.element_ty
    if ROT_DIM > 0:
        if NORM:
            if HAS_WEIGHT:
                if X_PAIRS:  # (weight and bias are read where x's elements are)
                    w = _weight(w_ptr, w_row, w_ok, tl.arange(0, 2 * HALF_PAD), ROT_DIM, WEIGHT_OFFSET, W_ROWS)
                    wa, wb = tl.split(tl.reshape(w, [w.shape[0], HALF_PAD, 2]))
                else:
                    wh = tl.arange(0, HALF_PAD)
                    wa = _weight(w_ptr, w_row, w_ok, wh, HALF, WEIGHT_OFFSET, W_ROWS)
                    wb = _weight(w_ptr + HALF, w_row, w_ok, wh, HALF, WEIGHT_OFFSET, W_ROWS)
                wa = wa[None, :, :]
                wb = wb[None, :, :]
            else:  # (unused: _scale applies no weight)
                wa = 0.0
                wb = 0.0
            if HAS_BIAS:
                if X_PAIRS:
                    bw = _weight(b_ptr, w_row, w_ok, tl.arange(0, 2 * HALF_PAD), ROT_DIM, 0.0, W_ROWS)
                    ba, bb = tl.split(tl.reshape(bw, [bw.shape[0], HALF_PAD, 2]))
                else:
                    bh = tl.arange(0, HALF_PAD)
                    ba = _weight(b_ptr, w_row, w_ok, bh, HALF, 0.0, W_ROWS)
                    bb = _weight(b_ptr + HALF, w_row, w_ok, bh, HALF, 0.0, W_ROWS)
                ba = ba[None, :, :]
                bb = bb[None, :, :]
            else:  # (unused: _scale adds no bias)
                ba = 0.0
                bb = 0.0
            a = _scale(a, r, wa, ba, CAST_BEFORE, HAS_WEIGHT, HAS_BIAS, X_CODE, Y_CODE)
            b = _scale(b, r, wb, bb, CAST_BEFORE, HAS_WEIGHT, HAS_BIAS, X_CODE, Y_CODE)
        if ROPE_FIRST:  # rotated in pass 1, before the norm
            oa = a
            ob = b
        else:
            oa, ob = _rotate(a, b, cos_ptr, sin_ptr, c_row, s_row, c_mask, t, t_ok, t_outer, t_inner, n_tokens,
                             c_so, c_si, s_so, c_sd, s_sd, ROT_DIM, HALF_PAD, R_CODE, INTERLEAVED, COS_PER_HEAD,
                             ROPE_CACHE, HALF_TABLE, BLOCK_T, BLOCK_H, NEG_SIN)
        if INTERLEAVED:
            dr = tl.arange(0, 2 * HALF_PAD)[None, None, :]
            o = tl.reshape(tl.join(oa, ob), [BLOCK_T, BLOCK_H, 2 * HALF_PAD])
            tl.store(o_ptr + o_row + dr, o.to(out_ty), mask=store_mask & (dr < ROT_DIM))
        else:
            da = tl.arange(0, HALF_PAD)[None, None, :]
            m = store_mask & (da < HALF)
            tl.store(o_ptr + o_row + da, oa.to(out_ty), mask=m)
            tl.store(o_ptr + o_row + HALF + da, ob.to(out_ty), mask=m)

    # ---- pass 2 over the tail: norm and store ---------------------------------------------
    for i in tl.static_range(N_TAIL):
        mt = row_mask & (dc + i * TAIL_CHUNK < TAIL)
        if N_TAIL == 1 and NORM:
            pc = p  # (LAYER: centred in pass 1)
        else:
            pc = tl.load(x_ptr + x_row + ROT_DIM + i * TAIL_CHUNK + dc, mask=mt, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            if NORM and LAYER:
                pc = pc - mu
        if NORM:
            wt_idx = tl.arange(0, TAIL_CHUNK) + i * TAIL_CHUNK
            if HAS_WEIGHT:
                wt = _weight(w_ptr + ROT_DIM, w_row, w_ok, wt_idx, TAIL, WEIGHT_OFFSET, W_ROWS)[None, :, :]
            else:  # (unused: _scale applies no weight)
                wt = 0.0
            if HAS_BIAS:
                bt = _weight(b_ptr + ROT_DIM, w_row, w_ok, wt_idx, TAIL, 0.0, W_ROWS)[None, :, :]
            else:  # (unused: _scale adds no bias)
                bt = 0.0
            pc = _scale(pc, r, wt, bt, CAST_BEFORE, HAS_WEIGHT, HAS_BIAS, X_CODE, Y_CODE)
        tl.store(o_ptr + o_row + ROT_DIM + i * TAIL_CHUNK + dc, pc.to(out_ty),
                 mask=store_mask & (dc + i * TAIL_CHUNK < TAIL))


@triton.jit
def qk_norm_rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
    q_eps, k_eps,
    n_tokens, n_inner, q_heads, k_heads, q_head_blocks, k_head_blocks, head_blocks,
    q_so, q_si, q_sh, k_so, k_si, k_sh,
    qo_so, qo_si, qo_sh, ko_so, ko_si, ko_sh,
    c_so, c_si, c_sh, s_so, s_si, s_sh,
    v_ptr, vo_ptr, idx_ptr, v_so, v_si, v_sh, vo_so, vo_si, vo_sh,
    idx_stride, cache_len, o_seq, vo_seq, qb_ptr, kb_ptr, c_sd, s_sd,
    qo_off, ko_off, c_off, s_off, q_off, k_off,
    HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    TAIL_CHUNK: tl.constexpr, N_TAIL: tl.constexpr,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, WEIGHT_OFFSET: tl.constexpr,
    CAST_BEFORE: tl.constexpr, X_CODE: tl.constexpr, Y_CODE: tl.constexpr, R_CODE: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_K: tl.constexpr, COS_PER_HEAD: tl.constexpr, ROPE_CACHE: tl.constexpr,
    Q_POS_AXIS: tl.constexpr, K_POS_AXIS: tl.constexpr, V_POS_AXIS: tl.constexpr, HAS_V: tl.constexpr,
    D_PAD: tl.constexpr, ACROSS: tl.constexpr, NORM_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HV: tl.constexpr,
    LAYER: tl.constexpr, HAS_BIAS: tl.constexpr, W_ROWS: tl.constexpr, HALF_TABLE: tl.constexpr,
    X_PAIRS: tl.constexpr, ROPE_FIRST: tl.constexpr, NEG_SIN: tl.constexpr,
):
    """1-D grid of cdiv(n_tokens, BLOCK_T) * head_blocks programs; the head block (q's, then k's,
    then v's) varies fastest, so neighbouring programs read neighbouring memory of one token block.

    The last of q/k may be written into a KV cache (its *_POS_AXIS >= 0: rows land at the positions
    in idx) and v, with the same heads, copied into its cache at the same positions.

    Head blocks are BLOCK_H heads of q, BLOCK_HK of k, BLOCK_HV of v (all BLOCK_H for per-head
    norms; across heads (ACROSS) one block holds all heads of its tensor).

    LAYER: a LayerNorm (the mean subtracted first); HAS_BIAS: its bias (qb_ptr/kb_ptr, laid out as
    the weights); W_ROWS: weight and bias have a row per head (ACROSS's [heads * head_dim], or an
    [H, D] weight of a per-head norm: Cohere, StableLM).

    ROPE_FIRST: the RoPE of x first (rounded to X_CODE: x's dtype, or the RoPE's with Recipe.keep_rope_dtype),
    then the norm of that (Recipe.rope_first).

    qo_off/ko_off/c_off/s_off/q_off/k_off: element offsets of the rows this launch reads or writes in
    the buffers passed as qo_ptr/ko_ptr/cos_ptr/sin_ptr/q_ptr/k_ptr (one part of a concatenation:
    its rows of the whole output, of the cos/sin table, of the one input it slices; 0 otherwise)."""
    pid = tl.program_id(0)
    cos_ptr += c_off
    sin_ptr += s_off
    q_ptr += q_off
    if HAS_K:
        k_ptr += k_off
    pid_t = pid // head_blocks
    pid_h = pid % head_blocks
    # A tile that cannot run (no k, no v) sits under a constexpr if and is not compiled at all, so
    # its pointers may be None and torch's analysis of what the kernel writes (what Inductor
    # clones) sees no stores through them.
    n_rope_blocks = q_head_blocks + k_head_blocks
    if HAS_V:
        if pid_h >= n_rope_blocks:
            _copy_tile(v_ptr, vo_ptr, pid_t, pid_h - n_rope_blocks, n_tokens, n_inner, k_heads,
                       v_so, v_si, v_sh, vo_so, vo_si, vo_sh, idx_ptr, idx_stride, cache_len, vo_seq,
                       HEAD_DIM, D_PAD, V_POS_AXIS, BLOCK_T, BLOCK_HV)
    # One helper call per tensor (not merged variables): Triton turns int args equal to 1 into
    # constexprs, so q's and k's strides need not have the same type.
    if HAS_K:
        if (pid_h >= q_head_blocks) & (pid_h < n_rope_blocks):
            _norm_rope_tile(
                k_ptr, ko_ptr + ko_off, kw_ptr, kb_ptr, cos_ptr, sin_ptr, k_eps, pid_t, pid_h - q_head_blocks,
                n_tokens, n_inner, k_heads, k_so, k_si, k_sh, ko_so, ko_si, ko_sh,
                c_so, c_si, c_sh, s_so, s_si, s_sh, idx_ptr, idx_stride, cache_len, o_seq, c_sd, s_sd,
                HEAD_DIM, ROT_DIM, HALF_PAD, TAIL_CHUNK, N_TAIL, NORM, HAS_WEIGHT, WEIGHT_OFFSET, CAST_BEFORE,
                X_CODE, Y_CODE, R_CODE, INTERLEAVED, COS_PER_HEAD, ROPE_CACHE, K_POS_AXIS, ACROSS, NORM_SUM, BLOCK_T, BLOCK_HK,
                LAYER, HAS_BIAS, W_ROWS, HALF_TABLE, X_PAIRS, ROPE_FIRST, NEG_SIN,
            )
    if pid_h < q_head_blocks:
        _norm_rope_tile(
            q_ptr, qo_ptr + qo_off, qw_ptr, qb_ptr, cos_ptr, sin_ptr, q_eps, pid_t, pid_h,
            n_tokens, n_inner, q_heads, q_so, q_si, q_sh, qo_so, qo_si, qo_sh,
            c_so, c_si, c_sh, s_so, s_si, s_sh, idx_ptr, idx_stride, cache_len, o_seq, c_sd, s_sd,
            HEAD_DIM, ROT_DIM, HALF_PAD, TAIL_CHUNK, N_TAIL, NORM, HAS_WEIGHT, WEIGHT_OFFSET, CAST_BEFORE,
            X_CODE, Y_CODE, R_CODE, INTERLEAVED, COS_PER_HEAD, ROPE_CACHE, Q_POS_AXIS, ACROSS, NORM_SUM, BLOCK_T, BLOCK_H,
            LAYER, HAS_BIAS, W_ROWS, HALF_TABLE, X_PAIRS, ROPE_FIRST, NEG_SIN,
        )


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from ..ops.recipe import DTYPE_CODES, Recipe, _hint, new_output, tensor_key  # noqa: E402


# A norm across heads keeps all heads of a token in one program: rows up to this many elements
# (padded to powers of two; 64 heads of 128 fit).
ACROSS_MAX_ROW = 8192


class UnsupportedLayout(ValueError):
    """The inputs cannot be expressed as [outer, inner, heads, head_dim] strided views."""


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Config:
    block_t: int
    block_h: int
    num_warps: int


_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "triton_configs.json")


@functools.lru_cache(maxsize=None)
def _config_table() -> dict:
    try:
        with open(_CONFIG_FILE) as f:
            return json.load(f)["table"]
    except (OSError, KeyError, ValueError):
        return {}


def _bucket_tokens(n: int) -> int:
    for b in (64, 256, 1024, 4096, 16384):
        if n <= b:
            return b
    return 65536


def bucket_key(n_tokens: int, q_heads: int, k_heads: int, head_dim: int) -> str:
    return f"d{_next_pow2(head_dim)}_t{_bucket_tokens(n_tokens)}_h{_next_pow2(q_heads + k_heads)}"


@functools.lru_cache(maxsize=1024)  # launch parameters are reused, not recomputed, per shape
def choose_config(n_tokens: int, q_heads: int, k_heads: int, head_dim: int, use_table: bool = True) -> Config:
    """Tile shape and warps: the committed tuning table (benchmarks/tune_triton.py) for the
    shape's bucket, the nearest tuned token bucket, or a heuristic."""
    if use_table:
        table = _config_table()
        key = bucket_key(n_tokens, q_heads, k_heads, head_dim)
        row = table.get(key)
        if row is None:  # nearest tuned token bucket with the same head_dim / heads
            prefix, suffix = key.split("_t")[0], key.split("_h")[-1]
            tuned = [(abs(int(k.split("_t")[1].split("_h")[0]).bit_length() - _bucket_tokens(n_tokens).bit_length()), k)
                     for k in table if k.startswith(prefix + "_t") and k.endswith("_h" + suffix)]
            if tuned:
                row = table[min(tuned)[1]]
        if row is not None:
            return Config(*row)
    d_pad = _next_pow2(head_dim)
    block_h = min(_next_pow2(min(q_heads, k_heads) if k_heads else q_heads), 8)
    block_t = max(1, min(16, 2048 // (block_h * d_pad)))
    return Config(block_t, block_h, 4)


def across_config(n_tokens: int, q_heads: int, k_heads: int, head_dim: int, config: Config | None) -> Config:
    """Tokens per program and warps for a norm across heads (all heads of a token in one program);
    a given config keeps its block_t and num_warps."""
    if config is not None:
        return config
    row = _next_pow2(max(q_heads, k_heads)) * _next_pow2(head_dim)
    if row < 2048:  # a few small heads: several tokens per program (not measured on a GPU)
        return Config(max(1, 2048 // row), 0, 4)
    # Measured on the H200 (benchmarks/tune_across.py; OLMo2 32/32, OLMoE 16/16, MiniMax-M2 48/8 at
    # 64 to 32k tokens): one token per program everywhere; at decode (few programs) 16 warps, else
    # 2048 row elements per warp. The old rule (8 warps) lost to Inductor at 32k tokens (0.93x).
    warps = row // 256 if n_tokens <= 256 else row // 2048
    return Config(1, 0, max(2, min(16, warps)))


@dataclasses.dataclass(frozen=True)
class _Axes:
    outer: int | None
    inner: int | None
    head: int | None


def _plan_axes(q_shape, q_stride, k_shape, cos_shape, token_dim: int | None = None,
               heads_dim: int = 0) -> _Axes:
    """Which leading dims of q are (outer token, inner token, head); others must have size 1.
    `token_dim` (a cache's sequence dim) must not be the head axis; `heads_dim` (< 0: a norm
    across heads, Recipe.norm_heads_dim) is the head axis."""
    lead = len(q_shape) - 1
    dims = [d for d in range(lead) if _hint(q_shape[d]) != 1 or (k_shape is not None and _hint(k_shape[d]) != 1)]
    head = None
    if heads_dim:
        head = len(q_shape) + heads_dim
        dims = [d for d in dims if d != head]
        if k_shape is not None and any(_hint(q_shape[d]) != _hint(k_shape[d]) for d in dims):
            raise UnsupportedLayout(f"q {tuple(q_shape)} and k {tuple(k_shape)} differ in a dim other than the heads")
    elif k_shape is not None:
        diff = [d for d in dims if _hint(q_shape[d]) != _hint(k_shape[d])]
        if len(diff) > 1:
            raise UnsupportedLayout(f"q {tuple(q_shape)} and k {tuple(k_shape)} differ in more than one dim")
        head = diff[0] if diff else None
    if head is None and dims:
        # Prefer a dim cos/sin broadcast over (their row is then shared by a tile), then the
        # fastest-moving one.
        off = lead - (len(cos_shape) - 1) if cos_shape is not None else None

        def broadcast_over(d):
            if cos_shape is None:
                return True
            cd = d - off
            return cd < 0 or _hint(cos_shape[cd]) == 1

        head = min(dims, key=lambda d: (d == token_dim, not broadcast_over(d), _hint(q_stride[d])))
    rest = sorted((d for d in dims if d != head), key=lambda d: -_hint(q_stride[d]))
    if len(rest) > 2:
        raise UnsupportedLayout(f"more than 3 non-trivial leading dims: {tuple(q_shape)}")
    rest = [None] * (2 - len(rest)) + rest
    return _Axes(rest[0], rest[1], head)


def _strides3(t: torch.Tensor | None, lead_shape, axes: _Axes) -> tuple:
    """Strides of t broadcast (right-aligned) to lead_shape + [last], on the three axes."""
    if t is None:
        return (0, 0, 0)
    off = len(lead_shape) - (t.dim() - 1)
    out = []
    for d in (axes.outer, axes.inner, axes.head):
        cd = None if d is None else d - off
        if cd is None or cd < 0 or (t.shape[cd] == 1 and lead_shape[d] != 1):
            out.append(0)
        else:
            out.append(t.stride(cd))
    return tuple(out)


def _eps_arg(v):
    """eps as the kernel takes it; a plan being made passes the names of its eps slots through."""
    return v if isinstance(v, str) else _as_float(v)


def _as_float(v):
    # An unbacked SymFloat (tensor eps read with .item() under tracing) must stay symbolic.
    return v if isinstance(v, torch.SymFloat) else float(v)


def _size(shape, d):
    return 1 if d is None else shape[d]


def supports(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor | None, recipe: Recipe,
             sin: torch.Tensor | None = None, q_weight: torch.Tensor | None = None,
             k_weight: torch.Tensor | None = None, positions: torch.Tensor | None = None,
             q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None) -> str | None:
    """None if the kernel computes these inputs exactly, else why not (positions: cache mode)."""
    heads_dim = recipe.norm_heads_dim or recipe.weight_heads_dim  # the kernel's head axis, if fixed
    if positions is not None:
        if positions.dtype not in (torch.int32, torch.int64):
            return f"positions must be int32/int64, not {positions.dtype}"
        if cos is None or cos.dim() != 2 or cos.shape[-1] != recipe.rotary_dim:
            return "the cos/sin cache must be [max_position, rotary_dim]"
        if cos.stride(-1) != 1:
            return "cos/sin cache last dim is not contiguous"
        try:
            axes = _plan_axes(q.shape, q.stride(), None if k is None else k.shape, positions.unsqueeze(-1).shape,
                              heads_dim=heads_dim)
        except UnsupportedLayout as e:
            return str(e)
        if _strides3(positions.unsqueeze(-1), q.shape[:-1], axes)[2] != 0:
            return "positions vary along the head dim"
        cos, sin = positions.unsqueeze(-1), None
    for t, name in ((q, "q"), (k, "k")):
        if t is None:
            continue
        if t.dtype not in DTYPE_CODES:
            return f"{name} dtype {t.dtype} is not float32/float16/bfloat16"
        if t.stride(-1) != 1 and t.shape[-1] != 1:
            return f"{name} last dim is not contiguous (stride {t.stride(-1)})"
    if k is not None and k.dtype != q.dtype:
        return f"q ({q.dtype}) and k ({k.dtype}) differ in dtype"
    if k is not None and (k.dim() != q.dim() or k.shape[-1] != q.shape[-1]):
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in rank or head_dim"
    if recipe.half_table and positions is not None:
        return "half_table takes cos/sin tensors, not a cos/sin cache"
    if recipe.deinterleave_input:
        if positions is not None:
            return "deinterleave_input takes cos/sin tensors, not a cos/sin cache"
        if recipe.interleaved or recipe.norm != "none" or not recipe.rotary_dim:
            return "deinterleave_input is implemented for neox RoPE alone (no norm, interleaved=False)"
    tables = () if recipe.half_table else ((cos, "cos"), (sin, "sin"))  # (a half table: any last-dim stride)
    for t, name in (*tables, (q_weight, "q weight"), (k_weight, "k weight"),
                    (q_bias, "q bias"), (k_bias, "k bias")):
        if t is not None and t.stride(-1) != 1 and t.shape[-1] != 1:
            return f"{name} last dim is not contiguous (stride {t.stride(-1)})"
    if k is not None and (q_bias is None) != (k_bias is None):
        return "one of q and k has a norm bias and the other not"
    if recipe.weight_heads_dim:  # rows of head_dim one after the other (what the kernel indexes)
        for t, name in ((q_weight, "q weight"), (k_weight, "k weight"), (q_bias, "q bias"), (k_bias, "k bias")):
            if t is not None and t.dim() == 2 and t.shape[0] != 1 and t.stride(0) != t.shape[-1]:
                return f"{name} rows are not contiguous (stride {t.stride(0)})"
    for dt in (recipe.norm_dtype, recipe.rope_dtype, recipe.out_dtype):
        if dt not in DTYPE_CODES:
            return f"dtype {dt} is not float32/float16/bfloat16"
    try:
        _plan_axes(q.shape, q.stride(), None if k is None else k.shape, None if cos is None else cos.shape,
                   heads_dim=heads_dim)
    except UnsupportedLayout as e:
        return str(e)
    if recipe.norm_heads_dim:
        for t, name in ((q, "q"), (k, "k")):
            if t is not None and _next_pow2(_hint(t.shape[recipe.norm_heads_dim])) * _next_pow2(t.shape[-1]) > ACROSS_MAX_ROW:
                return (f"{name}: norm across {t.shape[recipe.norm_heads_dim]} heads of {t.shape[-1]}: a row wider "
                        f"than {ACROSS_MAX_ROW} elements (one program holds a token's heads)")
    return None


@dataclasses.dataclass
class CacheTarget:
    """Where the fused call writes the rows of its last tensor (k, or q when there is no k): into
    ``cache`` at positions ``index`` along ``dim`` (the HF StaticCache write), with ``v`` (the same
    heads, no norm or RoPE) copied into ``v_cache`` at the same positions. The caches are written in
    place; the written tensor gets no output of its own."""

    cache: torch.Tensor
    index: torch.Tensor
    dim: int
    v: torch.Tensor | None = None
    v_cache: torch.Tensor | None = None


def _pos_axis(axes: _Axes, dim: int) -> int | None:
    """The kernel's POS_AXIS for a cache whose sequence dim is `dim`: 0/1 for the outer/inner token
    axis, 2 for a size-1 sequence (all tokens at idx[0]), None when it is the head axis."""
    if axes.outer == dim:
        return 0
    if axes.inner == dim:
        return 1
    if axes.head == dim:
        return None
    return 2


def _cache_strides(cache: torch.Tensor, written: torch.Tensor, dim: int, axes: _Axes) -> tuple:
    """The cache's strides on the three axes for rows shaped like `written`; the sequence axis gets
    0 (its offset comes from the looked-up position)."""
    view = cache.narrow(dim, 0, written.shape[dim])
    strides = list(_strides3(view, written.shape[:-1], axes))
    for i, d in enumerate((axes.outer, axes.inner, axes.head)):
        if d == dim:
            strides[i] = 0
    return tuple(strides)


def cache_unsupported(rotated: torch.Tensor, cache: torch.Tensor, index: torch.Tensor, dim: int,
                      v: tuple[torch.Tensor, torch.Tensor] | None = None) -> str | None:
    """None if the kernel can write `rotated`'s rows into `cache` (and v into its cache), else why."""
    if cache.dtype not in DTYPE_CODES:
        return f"cache dtype {cache.dtype}"
    if cache.stride(-1) != 1:
        return "cache last dim is not contiguous"
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        return "positions are not a 1-D integer tensor"
    if not 0 <= dim < cache.dim() - 1 or cache.dim() != rotated.dim():
        return "the cache's sequence dim is not one of the rotated tensor's leading dims"
    if v is not None:
        vt, vc = v
        if vt.shape[-1] != rotated.shape[-1] or vc.shape[-1] != rotated.shape[-1]:
            return f"v head_dim {vt.shape[-1]} != k head_dim {rotated.shape[-1]}"
        if vt.dim() != rotated.dim() or any(_hint(a) != _hint(b) for a, b in zip(vt.shape, rotated.shape)):
            return f"v {tuple(vt.shape)} and k {tuple(rotated.shape)} differ in shape"
        if vt.dtype != vc.dtype or vc.dtype not in DTYPE_CODES:
            return f"v dtype {vt.dtype} / v cache dtype {vc.dtype}"
        if vt.stride(-1) != 1 or vc.stride(-1) != 1:
            return "v or its cache has a non-contiguous last dim"
    return None


def launch(
    q: torch.Tensor,
    k: torch.Tensor | None,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_eps: float,
    k_eps: float,
    recipe: Recipe,
    *,
    traceable: bool = False,
    config: Config | None = None,
    num_stages: int | None = None,
    positions: torch.Tensor | None = None,
    cache: CacheTarget | None = None,
    out_strides: tuple | None = None,
    bases: dict | None = None,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    out: tuple | None = None,
):
    """Run the fused kernel; returns (q_out, k_out or None), laid out by recipe.new_output.

    With ``positions``, ``cos`` is a vLLM-style cos/sin cache [max_position, rotary_dim] (the
    cos of the rotary_dim/2 frequencies, then their sin), ``sin`` is unused, and ``positions``
    (integers, broadcastable to q.shape[:-1] with size 1 along the heads) picks each token's row.

    With ``cache``, the last of q/k is stored into the cache (see CacheTarget) and its output is
    None. ``out_strides`` = (q's, k's or None): the output layouts to allocate instead of
    recipe.new_output's (in a compiled graph: the strides its consumers were planned with).
    ``bases`` = {"q"/"k"/"v"/"cos"/"sin"/"q_out"/"k_out": tensor}: what to pass as that tensor's
    pointer: for q, k and v a tensor with the same data pointer (q before its transpose), for the
    others any tensor whose storage holds it (cos before its unsqueeze, the rows of a concatenation
    in its whole output), the kernel adding the element offset. Inductor then passes its buffer as
    is, without building the view on the host for every call (a few us each).
    ``out`` = (q_out, k_out or None): views to write the outputs into (with bases "q_out"/"k_out":
    the buffers they are views of, which the kernel then writes in place), instead of new tensors.

    traceable=True launches through torch.library.wrap_triton, so make_fx/Dynamo record a
    triton_kernel_wrapper node that Inductor launches directly from its generated code.

    Eager calls (concrete shapes; no cache target, bases or out_strides) reuse a launch plan per
    input layout: what is derived from shapes, strides, dtypes and the recipe is computed once
    (see _Plan).
    """
    if not traceable and cache is None and bases is None and out_strides is None and out is None:
        tensors = (q, k, q_weight, k_weight, cos, sin, positions, q_bias, k_bias)
        plan = _cached_plan(tensors, recipe, config, num_stages)
        if plan is not None:
            return plan.run(tensors, q_eps, k_eps)
    return _launch_full(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe, traceable, config, num_stages,
                        positions, cache, out_strides, bases, q_bias, k_bias, out=out)


_MAX_PLANS = 256
_PLANS: dict = {}
_UNPLANNED = object()


def aliases(tensors) -> tuple | None:
    """Which of the tensors are one tensor (q's weight given for k's too), as the index of each one's
    first occurrence; None when all are distinct (the common case, found without the pairwise scan).
    A plan's tensor slots follow it, so it is part of a plan's key."""
    present = [id(t) for t in tensors if t is not None]
    if len(set(present)) == len(present):
        return None
    return tuple(next(j for j in range(i + 1) if tensors[j] is t) for i, t in enumerate(tensors))


def plan_for(q, k, q_weight, k_weight, cos, sin, recipe: Recipe, positions=None, q_bias=None, k_bias=None):
    """The eager launch plan for these inputs' layout, or None where none stands for it (see _Plan).
    For callers that memoise their own per-layout work (qkfuse.functional): they run
    ``plan.run((q, k, q_weight, k_weight, cos, sin, positions, q_bias, k_bias), q_eps, k_eps)``, which
    is ``launch`` for inputs of that layout and aliasing, without its key."""
    return _cached_plan((q, k, q_weight, k_weight, cos, sin, positions, q_bias, k_bias), recipe, None, None)


def _cached_plan(tensors, recipe, config, num_stages):
    key = (recipe, config, num_stages, aliases(tensors), *map(tensor_key, tensors))
    try:
        plan = _PLANS.get(key, _UNPLANNED)
    except TypeError:  # a symbolic size (not hashable): no plan
        return None
    if plan is _UNPLANNED:
        q, k, q_weight, k_weight, cos, sin, positions, q_bias, k_bias = tensors
        plan = _PLANS[key] = _plan(q, k, q_weight, k_weight, cos, sin, recipe, config, num_stages, positions,
                                   q_bias, k_bias)
        if len(_PLANS) > _MAX_PLANS:  # a bounded cache: shapes seen long ago are planned again
            _PLANS.pop(next(iter(_PLANS)))
    return plan


class _Slot(int):
    """A tensor argument of a planned launch: index into (inputs..., q_out, k_out)."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    grid: tuple
    outputs: tuple  # ((shape, strides, dtype, device) of q_out, of k_out or None)
    args: tuple  # the kernel's positional arguments: _Slot for a tensor, "q_eps"/"k_eps", else as is
    kwargs: dict

    def __post_init__(self):
        # the few positions a call fills in (tensors, eps), so a run copies the rest as planned
        fills = tuple((i, a) for i, a in enumerate(self.args) if type(a) is _Slot or type(a) is str)
        object.__setattr__(self, "_fills", fills)

    def run(self, tensors, q_eps, k_eps):
        outs = tuple(None if o is None else torch.empty_strided(o[0], o[1], dtype=o[2], device=o[3])
                     for o in self.outputs)
        every = (*tensors, *outs)
        eps = {"q_eps": _as_float(q_eps), "k_eps": _as_float(k_eps)}
        args = list(self.args)
        for i, a in self._fills:
            args[i] = eps[a] if type(a) is str else every[a]
        qk_norm_rope_kernel[self.grid](*args, **self.kwargs)
        return outs


class _Recorder:
    """Stands in for the kernel while a plan is made: keeps the grid and the arguments."""

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.call = (grid, args, kwargs)
        return record


def _plan(q, k, q_weight, k_weight, cos, sin, recipe, config, num_stages, positions, q_bias,
          k_bias) -> _Plan | None:
    """The launch for these inputs' layout, or None where a plan cannot stand for it (a symbolic
    size, an argument that is none of the call's tensors): such calls take the full path each time."""
    recorder = _Recorder()
    q_out, k_out = _launch_full(q, k, q_weight, k_weight, cos, sin, "q_eps", "k_eps", recipe, False, config,
                                num_stages, positions, None, None, None, q_bias, k_bias, kernel=recorder)
    grid, args, kwargs = recorder.call
    tensors = (q, k, q_weight, k_weight, cos, sin, positions, q_bias, k_bias, q_out, k_out)

    slots = []
    for a in args:
        if isinstance(a, torch.Tensor):
            # the first slot holding this very tensor (a dummy pointer is another input)
            i = next((i for i, t in enumerate(tensors) if t is a), None)
            if i is None:
                return None
            slots.append(_Slot(i))
        elif isinstance(a, (torch.SymInt, torch.SymFloat)):
            return None
        else:
            slots.append(a)
    outputs = tuple(None if o is None else (tuple(o.shape), o.stride(), o.dtype, o.device) for o in (q_out, k_out))
    return _Plan(grid, outputs, tuple(slots), dict(kwargs))


def _launch_full(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe, traceable, config, num_stages,
                 positions, cache, out_strides, bases, q_bias, k_bias, kernel=None, out=None):
    cached_is_k = cache is not None and k is not None
    cached_is_q = cache is not None and k is None
    q_strides, k_strides = out_strides if out_strides is not None else (None, None)

    def output(x, strides):
        if strides is None:
            return new_output(x, recipe.out_dtype)
        return torch.empty_strided(x.shape, strides, dtype=recipe.out_dtype, device=x.device)

    if out is not None:
        q_out, k_out = out
    else:
        q_out = cache.cache if cached_is_q else output(q, q_strides)
        k_out = None if k is None else (cache.cache if cached_is_k else output(k, k_strides))
    table = cos if positions is None else positions.unsqueeze(-1)  # what varies per token
    axes = _plan_axes(q.shape, q.stride(), None if k is None else k.shape, None if table is None else table.shape,
                      None if cache is None else cache.dim, recipe.norm_heads_dim or recipe.weight_heads_dim)
    lead = q.shape[:-1]
    n_inner = _size(lead, axes.inner)
    n_tokens = _size(lead, axes.outer) * n_inner
    q_heads = _size(lead, axes.head)
    k_heads = 0 if k is None else _size(k.shape[:-1], axes.head)
    head_dim = q.shape[-1]
    across = bool(recipe.norm_heads_dim)
    if across:  # one program per token block holds all heads of q (of k): the tile's block_h is ignored
        config = across_config(_hint(n_tokens), _hint(q_heads), _hint(k_heads), head_dim, config)
        block_h, block_hk = _next_pow2(_hint(q_heads)), _next_pow2(_hint(k_heads))
    else:
        if config is None:
            config = choose_config(_hint(n_tokens), _hint(q_heads), _hint(k_heads), head_dim)
        block_h = block_hk = config.block_h
    q_head_blocks = triton.cdiv(q_heads, block_h)
    k_head_blocks = 0 if k is None else triton.cdiv(k_heads, block_hk)
    rd = recipe.rotary_dim
    if positions is None:
        cos_str, sin_str = _strides3(cos, lead, axes), _strides3(sin, lead, axes)
    else:  # token strides of the positions; the cache's row stride
        cos_str, sin_str, sin = _strides3(table, lead, axes), (cos.stride(0), 0, 0), positions
    has_weight = q_weight is not None
    has_bias = q_bias is not None
    cos_per_head = positions is None and cos is not None and (cos_str[2] != 0 or sin_str[2] != 0)
    half_table = bool(recipe.half_table) and positions is None and cos is not None

    written = k if cached_is_k else q
    q_str = _strides3(q, lead, axes)
    k_str = _strides3(k, k.shape[:-1], axes) if k is not None else (0, 0, 0)
    qo_str = _strides3(q_out, lead, axes) if not cached_is_q else None
    ko_str = (_strides3(k_out, k.shape[:-1], axes) if not cached_is_k else None) if k is not None else (0, 0, 0)
    # pointers of tiles that do not run are None (see the kernel)
    pos_axis, cache_args, v_args, v_head_blocks = -1, (None, 0, 0, 0, 0), (None, None, 0, 0, 0, 0, 0, 0), 0
    block_hv = block_hk if cached_is_k else block_h  # v has the written tensor's heads
    if cache is not None:
        pos_axis = _pos_axis(axes, cache.dim)
        if pos_axis is None:
            raise UnsupportedLayout("the cache's sequence dim is the kernel's head axis")
        cstr = _cache_strides(cache.cache, written, cache.dim, axes)
        if cached_is_q:
            qo_str = cstr
        else:
            ko_str = cstr
        cache_args = (cache.index, cache.index.stride(0), cache.cache.shape[cache.dim],
                      cache.cache.stride(cache.dim),
                      0 if cache.v is None else cache.v_cache.stride(cache.dim))
        if cache.v is not None:
            v_args = (cache.v, cache.v_cache, *_strides3(cache.v, written.shape[:-1], axes),
                      *_cache_strides(cache.v_cache, cache.v, cache.dim, axes))
            v_head_blocks = k_head_blocks if cached_is_k else q_head_blocks
    idx, idx_stride, cache_len, o_seq, vo_seq = cache_args
    head_blocks = q_head_blocks + k_head_blocks + v_head_blocks
    # tail chunks as wide as a rotated half (one register layout); the whole row without RoPE
    tail_chunk = _next_pow2(max(rd // 2, 1)) if rd else _next_pow2(head_dim)
    grid = (triton.cdiv(n_tokens, config.block_t) * head_blocks,)
    bases = bases or {}
    if kernel is None:
        kernel = torch.library.wrap_triton(qk_norm_rope_kernel) if traceable else qk_norm_rope_kernel
    # a dummy pointer (an input the kernel does not read) is q's base: no view for Inductor to build
    dummy, q_off = _pointer(bases, "q", q)
    k_ptr, k_off = _pointer(bases, "k", k)
    qo_ptr, qo_off = _pointer(bases, "q_out", q_out)
    ko_ptr, ko_off = _pointer(bases, "k_out", k_out)
    cos_ptr, c_off = (dummy, 0) if cos is None else _pointer(bases, "cos", cos)
    sin_ptr, s_off = (dummy, 0) if sin is None else _pointer(bases, "sin", sin)
    kernel[grid](
        dummy, k_ptr, qo_ptr, ko_ptr,
        q_weight if has_weight else dummy, (k_weight if k_weight is not None else q_weight) if has_weight else dummy,
        cos_ptr, sin_ptr,
        _eps_arg(q_eps), _eps_arg(k_eps),
        n_tokens, n_inner, q_heads, q_heads if k is None else k_heads, q_head_blocks, k_head_blocks,
        head_blocks,
        *q_str, *k_str, *qo_str, *ko_str,
        *cos_str, *sin_str,
        bases.get("v", v_args[0]) if cache is not None and cache.v is not None else None, v_args[1], idx,
        *v_args[2:],
        idx_stride, cache_len, o_seq, vo_seq,
        # (a dummy pointer without a bias, as for the weights)
        q_bias if has_bias else dummy, (k_bias if k_bias is not None else q_bias) if has_bias else dummy,
        *((cos.stride(-1), sin.stride(-1)) if half_table else (1, 1)),
        qo_off, ko_off, c_off, s_off, q_off, k_off,
        HEAD_DIM=head_dim,
        ROT_DIM=rd,
        HALF_PAD=_next_pow2(max(rd // 2, 1)),
        TAIL_CHUNK=tail_chunk,
        N_TAIL=triton.cdiv(head_dim - rd, tail_chunk),
        NORM=recipe.norm in ("rms", "layer"),
        HAS_WEIGHT=has_weight,
        WEIGHT_OFFSET=float(recipe.weight_offset),
        CAST_BEFORE=bool(recipe.cast_before_weight),
        X_CODE=DTYPE_CODES[recipe.norm_input_dtype(q.dtype)],
        Y_CODE=DTYPE_CODES[recipe.norm_dtype],
        R_CODE=DTYPE_CODES[recipe.rope_dtype],
        INTERLEAVED=bool(recipe.interleaved),
        HAS_K=k is not None,
        COS_PER_HEAD=cos_per_head,
        ROPE_CACHE=positions is not None,
        Q_POS_AXIS=pos_axis if cached_is_q else -1,
        K_POS_AXIS=pos_axis if cached_is_k else -1,
        V_POS_AXIS=pos_axis,
        HAS_V=cache is not None and cache.v is not None,
        D_PAD=_next_pow2(head_dim),
        ACROSS=across,
        NORM_SUM=bool(recipe.norm_sum),
        BLOCK_T=config.block_t,
        BLOCK_H=block_h,
        BLOCK_HK=block_hk,
        BLOCK_HV=block_hv,
        LAYER=recipe.norm == "layer",
        HAS_BIAS=has_bias,
        W_ROWS=across or bool(recipe.weight_heads_dim),
        HALF_TABLE=half_table,
        X_PAIRS=bool(recipe.interleaved or recipe.deinterleave_input),
        ROPE_FIRST=bool(recipe.rope_first),
        NEG_SIN=bool(recipe.negate_sin),
        num_warps=config.num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    return (None if cached_is_q else q_out), (None if cached_is_k else k_out)


def _pointer(bases: dict, name: str, t: torch.Tensor | None):
    """(the tensor to pass as t's pointer, the element offset of t in it): bases[name] if given."""
    base = bases.get(name)
    if base is None or t is None:
        return t, 0
    return base, t.storage_offset() - base.storage_offset()
