/* Hop-by-hop request headers on the kernel path, as Envoy 1.40 treats them.
 *
 * Owner: hop. Included by dp_decide_l7fp.h (it needs the parsed request in
 * l7fp_decide's per-CPU context); called by dp_msg_act (sk_msg.c, #ifdef
 * DP_HOP) on a FORWARD or REPLY verdict. fastpath/hop.py is the same rule in
 * Python (the reference model's).
 *
 * What the real Envoy does with an HTTP/1.1 request (measured with the binary,
 * docs/fastpath.md "Hop-by-hop request headers"):
 *   Connection: keep-alive    removed, nothing else happens
 *   Connection: close         removed, and Envoy closes the client's connection
 *                             after its response (so does Proxy-Connection: close)
 *   Connection: x-foo         removed, and so is the header x-foo
 *   Keep-Alive, Proxy-Connection (other values): removed
 *   TE: trailers              kept ("trailers" compared case-sensitively);
 *                             any other TE is dropped or rewritten to "trailers"
 * The kernel removes what Envoy only removes (Connection: keep-alive, Keep-Alive,
 * Proxy-Connection: keep-alive: at most DP_HOP_MAX lines, popped from the
 * message), keeps one "TE: trailers", and hands everything else to Envoy
 * (DP_R_CONN_CLOSE, DP_R_HOP): it cannot close the client's connection after
 * the app's response, and nominations or a TE rewrite are rare and would need
 * a token scan. Names and values are compared whole, so a false hit cannot
 * happen; a miss only means Envoy.
 *
 * Why here and not in the parser (l7fp_parse_header): there each added branch
 * is walked by the verifier once per header line and per state of the
 * decision (dp_msg_verdict 637k -> 722k instructions with bookinfo's knobs);
 * here, at the start of dp_msg_act, it is walked once (+~2k). At run time a
 * line whose name is not 2, 10 or 16 bytes long costs a few instructions.
 */
#ifndef DP_HOP_H
#define DP_HOP_H

#define DP_HOP 1
#define DP_HOP_MAX 3       /* lines removed per request; more: Envoy */
#define DP_HOP_SLOTS 4     /* size of dp_verdict.hop_at, power of two > DP_HOP_MAX */

#define DP_W_CONNECTI L7FP_W8('c', 'o', 'n', 'n', 'e', 'c', 't', 'i')
#define DP_W_NNECTION L7FP_W8('n', 'n', 'e', 'c', 't', 'i', 'o', 'n')
#define DP_W_KEEP_ALI L7FP_W8('k', 'e', 'e', 'p', '-', 'a', 'l', 'i')
#define DP_W_EP_ALIVE L7FP_W8('e', 'p', '-', 'a', 'l', 'i', 'v', 'e')
#define DP_W_PROXY_CO L7FP_W8('p', 'r', 'o', 'x', 'y', '-', 'c', 'o')
#define DP_W_TE L7FP_W8('t', 'e', 0, 0, 0, 0, 0, 0)
#define DP_W_TRAILERS L7FP_W8('t', 'r', 'a', 'i', 'l', 'e', 'r', 's')
#define DP_W_CLOSE L7FP_W8('c', 'l', 'o', 's', 'e', 0, 0, 0)

#define DP_HOP_KEEP 0 /* dp_hop_line: not hop-by-hop, or kept as it is */
#define DP_HOP_DROP 1 /* removed (Envoy only removes it) */

/* 1 when the 64-bit words a and b are equal, without a branch (L7FP_EQ wants
 * values below 2^62: the xor is folded into 32 bits first). */
static __always_inline __u64 dp_hop_eq64(__u64 a, __u64 b)
{
    __u64 d = a ^ b;
    return L7FP_EQ((d >> 32) | (d & 0xffffffffULL), 0);
}

/* Header line k of the parsed head: DP_HOP_KEEP, DP_HOP_DROP or a PASS reason.
 * v->hop_te counts the TE lines seen (a second one: Envoy merges them).
 * Branch-free past the length test: a branch per case here multiplied the
 * paths the verifier walks per line (dp_msg_act 266k -> 378k instructions).
 * The value is taken as Envoy's clients write it, "name: value" with at most
 * one space after the colon and none after the value; other spacing is not
 * recognised, which only means Envoy. */
static __always_inline __u32 dp_hop_line(struct l7fp_req_ctx *c, __u32 k, struct dp_verdict *v)
{
    struct l7fp_req *r = &c->r;
    __u64 s = r->ls[k & L7FP_LINE_MASK], col = r->lc[k & L7FP_LINE_MASK];
    __u64 len = col - s;
    __u64 l2 = L7FP_EQ(len, 2), l10 = L7FP_EQ(len, 10), l16 = L7FP_EQ(len, 16);
    if (!(l2 | l10 | l16))
        return DP_HOP_KEEP; /* most lines end here */
    __u64 e = r->le[k & L7FP_LINE_MASK];
    __u64 w0 = l7fp_lower64(l7fp_load64(c, s)), w1 = l7fp_lower64(l7fp_load64(c, col - 8));
    __u64 vs = col + 1 + L7FP_EQ(l7fp_byte(c, col + 1), ' '), vlen = e - vs;
    __u64 v0 = l7fp_load64(c, vs), v0l = l7fp_lower64(v0);
    __u64 v2l = l7fp_lower64(l7fp_load64(c, vs + 2));
    __u64 te = l2 & dp_hop_eq64(w0 & 0xffff, DP_W_TE);
    __u64 ka = l10 & dp_hop_eq64(w0, DP_W_KEEP_ALI) & dp_hop_eq64(w1, DP_W_EP_ALIVE);
    __u64 conn = ((l10 & dp_hop_eq64(w0, DP_W_CONNECTI)) |
                  (l16 & dp_hop_eq64(w0, DP_W_PROXY_CO))) & dp_hop_eq64(w1, DP_W_NNECTION);
    __u64 vka = L7FP_EQ(vlen, 10) & dp_hop_eq64(v0l, DP_W_KEEP_ALI) &
                dp_hop_eq64(v2l, DP_W_EP_ALIVE);
    __u64 vclose = L7FP_EQ(vlen, 5) & dp_hop_eq64(v0l & 0xffffffffffULL, DP_W_CLOSE);
    __u64 vtr = L7FP_EQ(vlen, 8) & dp_hop_eq64(v0, DP_W_TRAILERS); /* case-sensitive */
    v->hop_te += te;
    __u64 te_bad = te & ((1 - vtr) | (1 - L7FP_EQ(v->hop_te, 1)));
    __u64 close = conn & vclose;
    __u64 hop = (conn & (1 - vka) & (1 - vclose)) | te_bad;
    __u64 drop = ka | (conn & vka);
    return L7FP_SEL(close, DP_R_CONN_CLOSE, L7FP_SEL(hop, DP_R_HOP, drop));
}

/* The lines to remove into v->hop_at (start | length << 16, head order).
 * 0, or a PASS reason. */
static __always_inline __u32 dp_hop_scan(struct l7fp_req_ctx *c, struct dp_verdict *v)
{
    struct l7fp_req *r = &c->r;
    v->hop_n = v->hop_te = 0;
    for (__u32 k = 1; k < L7FP_MAX_LINES; k++) {
        asm volatile("" ::: "memory");
        if (k >= r->nlines)
            break;
        __u32 w = dp_hop_line(c, k, v);
        if (w == DP_HOP_KEEP)
            continue;
        if (w != DP_HOP_DROP)
            return w;
        __u32 n = v->hop_n;
        if (n >= DP_HOP_MAX)
            return DP_R_HOP;
        __u32 s = r->ls[k & L7FP_LINE_MASK], e = r->le[k & L7FP_LINE_MASK];
        v->hop_at[n & (DP_HOP_SLOTS - 1)] = s | (e + 2 - s) << 16;
        v->hop_n = n + 1;
    }
    return 0;
}

/* Pops the recorded lines, the last first so the earlier offsets stay right.
 * Returns the bytes removed, or -1 when a pop failed. */
static __always_inline int dp_hop_pop(struct sk_msg_md *msg, struct dp_verdict *v)
{
    __u32 n = v->hop_n, removed = 0;
#pragma unroll
    for (int j = DP_HOP_SLOTS - 1; j >= 0; j--) {
        if ((__u32)j >= n)
            continue;
        __u32 at = v->hop_at[j] & 0xffff, len = v->hop_at[j] >> 16;
        if (!len || bpf_msg_pop_data(msg, at, len, 0))
            return -1;
        removed += len;
    }
    return (int)removed;
}

/* Start of dp_msg_act, on dp_msg_verdict's per-CPU verdict `v` and write size
 * `size`: a FORWARD or REPLY whose hop-by-hop headers Envoy would treat in a
 * way the kernel does not becomes a PASS (v->reason says why), except the
 * kernel's own 429 (a kernel-owned bucket: Envoy's copy is off, so Envoy would
 * serve the request unlimited; with `Connection: close` the connection is
 * closed after the reply, DP_F_CLOSE_AFTER, dp_close.h); a FORWARD's removable lines are popped. The
 * lengths are updated in the scratch, in memory, and dp_msg_act reads them
 * back from there: the verifier then sees the same unknown values whether lines
 * were popped or not, and walks the rest of dp_msg_act once (adjusted in
 * registers, it walked 905k instead of 266k instructions with bookinfo's
 * knobs). Popping before the checks that may still send the request to Envoy
 * is harmless: Envoy removes these lines too. A request handed to Envoy here
 * makes the connection sticky (DP_F_ENVOY). 0, or -1 when a pop failed. */
static __always_inline int dp_hop_act(struct sk_msg_md *msg, struct dp_conn *conn,
                                      struct dp_verdict *v, __u32 *size)
{
    if (v->kind != DP_K_FORWARD && v->kind != DP_K_REPLY)
        return 0;
    struct l7fp_req_ctx *c = l7fp_ctx_get();
    __u32 why = c ? dp_hop_scan(c, v) : DP_R_HOP;
    if (why && !(v->kind == DP_K_REPLY && v->status == 429)) {
        v->kind = DP_K_PASS;
        v->reason = why;
        /* Envoy may close the connection after its response (any "close"
         * token, which only conn_close spots exactly): a request written after
         * it must meet that close, as it would without the kernel path (seen:
         * the next request, written before Envoy's FIN arrived, was served by
         * the kernel). So the connection stays with Envoy (sticky). */
        conn->flags |= DP_F_ENVOY;
        return 0;
    }
    if (why == DP_R_CONN_CLOSE) /* the kernel's 429: Envoy answers, then closes (dp_close.h) */
        conn->flags |= DP_F_CLOSE_AFTER;
    if (v->kind != DP_K_FORWARD || !v->hop_n)
        return 0;
    int h = dp_hop_pop(msg, v);
    if (h < 0)
        return -1;
    *size -= h;
    v->consumed -= h;
    v->head_len -= h;
    return 0;
}

#endif /* DP_HOP_H */
