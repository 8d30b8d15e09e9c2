/* Path rewrites of forwarded requests (Envoy's regex_rewrite in the forms the
 * kernel does exactly: fastpath/rewrite.py, docs/split.md "Regex path rewrites").
 *
 * Owner: the rewrite part (fastpath/rewrite.py decides what is a kernel form,
 * fastpath/rewrite_kernel.py fills the map). Pasted after dp_redir.h and
 * before sk_msg.c (fastpath/loader.py). Compiled in only with -DDP_REWRITE=1,
 * which the synthesis sets for a plan with a KERNEL route carrying a
 * PathRewrite, and only with the plan's decision (l7fp_decide: the request
 * is still parsed in the per-CPU l7fp_ctx_get()); otherwise every hook here
 * is empty and the map does not exist.
 *
 * dp_rw[(gen, route id)] (agent-written per generation): the first `cut`
 * bytes of the path (DP_RW_WHOLE: all of it, up to the '?') are replaced by
 * `value`; with `check_len`, only when the path starts with `check` (else the
 * path is left as is, as Envoy leaves a path its pattern does not match). In
 * every case the line "x-envoy-original-path: <target as sent>" goes after
 * the head's last header line, before the route's own header inserts move it
 * down: Envoy's order is the route's adds, then this line. A request that
 * carries the header itself (Envoy overwrites it in place) goes to Envoy.
 *
 * The destination's inbound decision (dp_msg_in) runs on the rewritten path,
 * as the destination's sidecar does: dp_msg_rwin (sk_msg.c, a tail call of
 * its own) builds that path in the per-CPU parse context (dp_rw_build, past
 * the head's copy) and points path_off/path_len at it; dp_msg_in puts the
 * parsed path back after the decision (dp_rw_unbuild), for dp_rewrite.
 */
#ifndef L7FP_DP_REWRITE_H
#define L7FP_DP_REWRITE_H

#ifndef DP_REWRITE
#define DP_REWRITE 0
#endif
#define DP_R_RW 23 /* path rewrite route: x-envoy-original-path sent, a target over DP_RW_TARGET,
                   * or a rewritten path the inbound sidecar would normalize */

/* What a request's route does with its path (scratch field `rw`, set once
 * per request by dp_rw_state, in dp_msg_rwin or dp_msg_act): 0 not known yet. */
#define DP_RW_NONE 1    /* no rewrite */
#define DP_RW_YES 2     /* the kernel rewrites (dp_msg_rw) */
#define DP_RW_REFUSED 3 /* rewrite route, but Envoy's: x-envoy-original-path sent, or
                         * a target longer than the kernel copies */

#if DP_REWRITE && defined(L7FP_DEFS_H)
#define DP_RW_ON 1
#else
#define DP_RW_ON 0
#endif

#if DP_RW_ON
#define DP_RW_GROW (DP_RW_NAME + DP_RW_TARGET + 2 + DP_RW_MAX) /* most a rewrite adds */
#define DP_RW_WHOLE 0xffff /* cut: the whole path */
#define DP_RW_MAX 64       /* bytes of a constant or a literal to compare (power of 2) */
#define DP_RW_NAME 32      /* room for "x-envoy-original-path: " */
#define DP_RW_TARGET 256   /* longest request target the kernel copies into the header */

struct dp_rw {
    __u32 on;        /* 1: the route rewrites */
    __u32 cut;       /* path bytes replaced, or DP_RW_WHOLE */
    __u32 check_len; /* 0: no compare */
    __u32 value_len; /* 1..DP_RW_MAX */
    __u32 slot;      /* l7fp header slot of x-envoy-original-path */
    __u32 name_len;  /* bytes of `name` */
    __u8 name[DP_RW_NAME];
    __u8 check[DP_RW_MAX];
    __u8 value[DP_RW_MAX + 8]; /* + 8: a word read at any index below DP_RW_MAX stays inside */
};

BPF_ARRAY(dp_rw, struct dp_rw, 2 * L7FP_N_ROUTES);

/* The rewrite of dp_verdict route `route` (route id + 1) in generation gen, or NULL. */
static __always_inline struct dp_rw *dp_rw_get(__u32 gen, __u32 route)
{
    if (!route || route > L7FP_N_ROUTES)
        return 0;
    __u32 k = (gen & 1) * L7FP_N_ROUTES + route - 1;
    struct dp_rw *rw = dp_rw.lookup(&k);
    return rw && rw->on ? rw : 0;
}

/* What the request does with the route's rewrite `rw` (dp_rw_get: the one
 * lookup of dp_msg_rwin, or of dp_msg_act when no inbound decision ran):
 * DP_RW_NONE, DP_RW_YES or DP_RW_REFUSED. */
static __always_inline __u32 dp_rw_state(struct dp_rw *rw)
{
    if (!rw)
        return DP_RW_NONE;
    struct l7fp_req_ctx *ctx = l7fp_ctx_get();
    if (!ctx || ctx->r.slot_len[rw->slot & L7FP_SLOT_MASK] != 0 ||
        ctx->r.sp2 - ctx->r.path_off > DP_RW_TARGET)
        return DP_RW_REFUSED;
    return DP_RW_YES;
}

/* dp_msg_act's look when dp_msg_rwin did not run. */
static __always_inline __u32 dp_rw_state_of(__u32 gen, __u32 route)
{
    return dp_rw_state(dp_rw_get(gen, route));
}

/* The loops below compare their index with a length loaded afresh in every
 * round (map value or per-CPU context), never with a register the rest of
 * the function keeps: a kept bound is narrowed to a different constant at
 * each exit, and the verifier then walked everything after the loop once per
 * length (over its 1M-instruction budget in dp_msg_act). */

/* Copy N bytes (N <= DP_RW_TARGET, read afresh at each use) from src(j) to
 * the packet at dst: 8-byte words, the last word overlapping the one before
 * (it rewrites bytes already right); under 8 bytes, byte by byte. A byte
 * loop of DP_RW_TARGET rounds cost the verifier ~100k instructions for each
 * state reaching it. x86 has no strict alignment: the verifier takes
 * unaligned packet words. Evaluates to 0, or -1. */
#define DP_RW_COPY(dst, end, src, N)                                              \
    ({                                                                            \
        int _ret = 0;                                                             \
        if ((N) >= 8) {                                                           \
            for (__u32 _i = 0; _i < DP_RW_TARGET / 8; _i++) {                     \
                __u32 _j = _i * 8;                                                \
                asm volatile("" : "+r"(_j));                                      \
                if (_j + 8 > (N) || _j >= DP_RW_TARGET)                            \
                    break;                                                        \
                __u8 *_p = (dst) + _j;                                            \
                if ((void *)(_p + 8) > (end)) {                                   \
                    _ret = -1;                                                    \
                    break;                                                        \
                }                                                                 \
                *(__u64 *)_p = *(__u64 *)(src(_j));                               \
            }                                                                     \
            __u32 _l = ((N) - 8) & (DP_RW_TARGET - 1);                            \
            __u8 *_q = (dst) + _l;                                                \
            if ((void *)(_q + 8) > (end))                                         \
                _ret = -1;                                                        \
            else                                                                  \
                *(__u64 *)_q = *(__u64 *)(src(_l));                               \
        } else {                                                                  \
            for (__u32 _i = 0; _i < 8; _i++) {                                    \
                __u32 _j = _i;                                                    \
                asm volatile("" : "+r"(_j));                                      \
                if (_j >= (N) || _j >= 8)                                         \
                    break;                                                        \
                __u8 *_p = (dst) + _j;                                            \
                if ((void *)(_p + 1) > (end)) {                                   \
                    _ret = -1;                                                    \
                    break;                                                        \
                }                                                                 \
                *_p = *(__u8 *)(src(_j));                                         \
            }                                                                     \
        }                                                                         \
        _ret;                                                                     \
    })

#define DP_RW_TLEN(ctx) ((ctx)->r.sp2 - (ctx)->r.path_off)
#define DP_RW_HEAD_AT(j) (ctx->buf + ((ctx->r.path_off + (j)) & L7FP_BUF_MASK))
#define DP_RW_VALUE_AT(j) (rw->value + ((j) & (DP_RW_MAX - 1)))
#define DP_RW_NAME_LEN 23 /* "x-envoy-original-path: " */

/* Insert "\r\nx-envoy-original-path: TARGET" at `at` (the CR LF that ends
 * the head's last header line: the line goes after it, and the CR LF at `at`
 * now ends this line), TARGET being the request target of the parsed head.
 * The CR LF first keeps every write at a constant or loop offset. Returns the
 * bytes inserted or -1. */
static __always_inline int dp_rw_original(struct sk_msg_md *msg, struct l7fp_req_ctx *ctx,
                                          struct dp_rw *rw, __u32 at, __u32 tlen)
{
    if (rw->name_len != DP_RW_NAME_LEN)
        return -1;
    __u32 h = 2 + DP_RW_NAME_LEN + tlen;
    if (bpf_msg_push_data(msg, at, h, 0))
        return -1;
    if (bpf_msg_pull_data(msg, at, at + h, 0))
        return -1;
    __u8 *d = msg->data;
    void *end = msg->data_end;
    if ((void *)(d + 2 + DP_RW_NAME_LEN) > end)
        return -1;
    d[0] = '\r';
    d[1] = '\n';
    *(__u64 *)(d + 2) = *(__u64 *)(rw->name);
    *(__u64 *)(d + 10) = *(__u64 *)(rw->name + 8);
    *(__u32 *)(d + 18) = *(__u32 *)(rw->name + 16);
    *(__u16 *)(d + 22) = *(__u16 *)(rw->name + 20);
    d[24] = rw->name[22];
    if (DP_RW_COPY(d + 2 + DP_RW_NAME_LEN, end, DP_RW_HEAD_AT, DP_RW_TLEN(ctx)) < 0)
        return -1;
    return (int)h;
}

/* 1 when the path at off starts with the route's literal (check_len <= plen). */
static __always_inline int dp_rw_starts(struct l7fp_req_ctx *ctx, struct dp_rw *rw, __u32 off)
{
    for (__u32 i = 0; i < DP_RW_MAX; i++) {
        __u32 j = i;
        asm volatile("" : "+r"(j));
        if (j >= rw->check_len || j >= DP_RW_MAX)
            break;
        if (ctx->buf[(off + j) & L7FP_BUF_MASK] != rw->check[j])
            return 0;
    }
    return 1;
}

#define DP_RW_AT L7FP_MAX_HDR /* ctx->buf offset of the rewritten path: past the head's copy */
/* dp_rw_build writes whole words up to DP_RW_AT + DP_RW_MAX + DP_RW_TARGET + 8
 * into ctx->buf, masked with L7FP_BUF_MASK: with a smaller buffer the
 * rewritten path would wrap onto the head's copy at buf[0..] (the parsed
 * request line). fastpath.synth_tables raises L7FP_MAX_HDR to
 * rewrite_kernel.MIN_MAX_HDR (512) when it sets DP_REWRITE. */
_Static_assert(DP_RW_AT + DP_RW_MAX + DP_RW_TARGET + 8 <= L7FP_BUF_MASK + 1,
               "DP_REWRITE needs L7FP_MAX_HDR >= 512 (dp_rw_build would wrap onto the head)");

/* 1 when the path at DP_RW_AT (ctx->r.path_len bytes) has "//", "/./",
 * "/../" or ends in "/." or "/..": the parser's L7FP_TF_DOTSEG (l7fp_http.h
 * l7fp_scan_byte), which the decision leaves to Envoy (the inbound sidecar
 * may normalize it). Branch-free per position, as the parser: a branch per
 * byte would multiply the verifier's states; the loop stops after the path's
 * end. The rewritten path starts with '/' (dp_rw_build). */
static __always_inline int dp_rw_dotseg(struct l7fp_req_ctx *ctx)
{
    __u64 bad = 0;
    for (__u32 i = 1; i <= DP_RW_MAX + DP_RW_TARGET; i++) {
        __u64 len = ctx->r.path_len; /* read afresh each round (see the loops below) */
        if (i > len)
            break; /* a short path: a few rounds, not all */
        __u64 ch = l7fp_byte(ctx, DP_RW_AT + i), prev = l7fp_byte(ctx, DP_RW_AT + i - 1);
        __u64 p2 = l7fp_byte(ctx, DP_RW_AT + i - 2), p3 = l7fp_byte(ctx, DP_RW_AT + i - 3);
        __u64 end = L7FP_EQ(i, len), sl = L7FP_EQ(ch, '/') & (1 - end);
        __u64 dotseg = L7FP_EQ(prev, '.') &
                       (L7FP_EQ(p2, '/') | (L7FP_EQ(p2, '.') & L7FP_EQ(p3, '/')));
        bad |= (sl & L7FP_EQ(prev, '/')) | ((sl | end) & dotseg);
    }
    return (int)bad;
}

/* Whether the route's rewrite `rw` applies to the path at off (plen bytes):
 * 0 no (its prefix is longer than the path, or differs: the path stays), -1 a
 * bad entry (no value, or one over DP_RW_MAX), else the value's length; *cut:
 * the path's bytes the value replaces. One rule for dp_rw_build (the path the
 * inbound decision sees) and dp_rw_path (the path sent): they must agree. */
static __always_inline int dp_rw_applies(struct l7fp_req_ctx *ctx, struct dp_rw *rw, __u32 off,
                                         __u32 plen, __u32 *cut)
{
    __u32 c = rw->cut == DP_RW_WHOLE ? plen : rw->cut;
    *cut = c;
    if (c > plen || rw->check_len > plen)
        return 0;
    if (rw->check_len && !dp_rw_starts(ctx, rw, off))
        return 0;
    __u32 m = rw->value_len;
    return m == 0 || m > DP_RW_MAX ? -1 : (int)m;
}

/* dp_msg_rwin, for the destination's inbound decision: the path as that
 * destination's sidecar gets it (the route's rewrite applied, as dp_rw_path
 * will do to the message) in place of the parsed one: built at DP_RW_AT of the
 * per-CPU parse context, ctx->r.path_off/path_len pointing at it; the parsed
 * values go to saved[0], saved[1] (dp_rw_unbuild puts them back). The query
 * stays where it was parsed (r.q, r.sp2): a rewrite keeps it. Returns 0 (built,
 * or the path stays as it is: no rewrite for it, as in dp_rw_path), 1 when
 * the request must go to Envoy (a target over DP_RW_TARGET, a bad entry, or
 * a new path the inbound sidecar may normalize). `rw`: the route's dp_rw. */
static __always_inline int dp_rw_build(struct dp_rw *rw, __u32 *saved)
{
    struct l7fp_req_ctx *ctx = l7fp_ctx_get();
    if (!rw || !ctx)
        return 1;
    __u32 off = ctx->r.path_off, plen = ctx->r.path_len;
    if (ctx->r.sp2 - off > DP_RW_TARGET || plen > DP_RW_TARGET || off > L7FP_MAX_HDR)
        return 1;
    __u32 cut = 0;
    int r = dp_rw_applies(ctx, rw, off, plen, &cut);
    if (r <= 0)
        return r < 0; /* a bad entry: Envoy */
    __u32 m = (__u32)r;
    if (rw->value[0] != '/')
        return 1; /* a path not starting with '/': not decided here */
    /* whole words, all of them: bytes past the new path are never read as
     * path, and no source byte of the head (below DP_RW_AT) is overwritten */
#pragma unroll
    for (__u32 j = 0; j < DP_RW_MAX; j += 8)
        *(__u64 *)(ctx->buf + DP_RW_AT + j) = *(__u64 *)(rw->value + j);
#pragma unroll
    for (__u32 j = 0; j < DP_RW_TARGET; j += 8)
        *(__u64 *)(ctx->buf + l7fp_bmask(DP_RW_AT + m + j)) =
            *(__u64 *)(ctx->buf + l7fp_bmask(off + cut + j));
    saved[0] = off;
    saved[1] = plen;
    ctx->r.path_off = DP_RW_AT;
    ctx->r.path_len = m + plen - cut;
    return dp_rw_dotseg(ctx);
}

/* dp_msg_in after the inbound decision: the parsed path back (saved by
 * dp_rw_build; saved[1] = 0: nothing was built). */
static __always_inline void dp_rw_unbuild(__u32 *saved)
{
    struct l7fp_req_ctx *ctx = l7fp_ctx_get();
    if (!ctx || !saved[1])
        return;
    ctx->r.path_off = saved[0];
    ctx->r.path_len = saved[1];
}

/* Replace the path's first cut bytes at off by the route's value. *delta: the
 * change of the message's length. 0 done (or the path left as is), -1 failed. */
static __always_inline int dp_rw_path(struct sk_msg_md *msg, struct l7fp_req_ctx *ctx,
                                      struct dp_rw *rw, __u32 off, __u32 plen, int *delta)
{
    *delta = 0;
    __u32 cut = 0;
    int r = dp_rw_applies(ctx, rw, off, plen, &cut);
    if (r <= 0)
        return r;
    __u32 m = (__u32)r;
    if (m > cut && bpf_msg_push_data(msg, off + cut, m - cut, 0))
        return -1;
    if (m < cut && bpf_msg_pop_data(msg, off + m, cut - m, 0))
        return -1;
    if (bpf_msg_pull_data(msg, off, off + m, 0))
        return -1;
    *delta = (int)m - (int)cut;
    __u8 *d = msg->data;
    void *end = msg->data_end;
    return DP_RW_COPY(d, end, DP_RW_VALUE_AT, rw->value_len);
}

/* dp_msg_rw on a FORWARD it is about to send, before the header inserts:
 * the route's rewrite. Returns the bytes the message grew by (negative:
 * shrank), 0 for a route without one; DP_RW_FAILED when the message is no
 * longer usable (the caller sends it to Envoy). v->head_len follows the path's
 * change, so the route's header inserts land before x-envoy-original-path;
 * *line: that line's bytes (the destination's inbound inserts go after it,
 * as its sidecar appends them: seen with two Envoys in a mesh). */
#define DP_RW_FAILED (-0x10000)
static __always_inline int dp_rewrite(struct sk_msg_md *msg, struct dp_verdict *v, __u32 gen,
                                      __u32 *line)
{
    struct dp_rw *rw = dp_rw_get(gen, v->route);
    if (!rw)
        return 0;
    struct l7fp_req_ctx *ctx = l7fp_ctx_get();
    if (!ctx || v->head_len < 4)
        return DP_RW_FAILED;
    __u32 off = ctx->r.path_off, plen = ctx->r.path_len;
    __u32 tlen = ctx->r.sp2 - off;
    if (off < 2 || off > L7FP_MAX_HDR || tlen > DP_RW_TARGET || plen > tlen)
        return DP_RW_FAILED;
    int h = dp_rw_original(msg, ctx, rw, v->head_len - 4, tlen);
    if (h < 0)
        return DP_RW_FAILED;
    *line = (__u32)h;
    int delta = 0;
    if (dp_rw_path(msg, ctx, rw, off, plen, &delta) < 0)
        return DP_RW_FAILED;
    v->head_len += delta;
    return h + delta;
}
#else
#define DP_RW_GROW 0
static __always_inline void dp_rw_unbuild(__u32 *saved) {}
#endif /* DP_RW_ON */

#endif /* L7FP_DP_REWRITE_H */
