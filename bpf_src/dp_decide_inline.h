/* Minimal built-in decision of the data path (K2), for the plumbing tests and
 * as the fallback before a plan's l7fp_decide (include/, K1) is compiled in.
 *
 * Deliberately small: the request must be "GET /path HTTP/1.1" with its head
 * (ending CRLFCRLF) inside the first DP_IHDR_MAX bytes of the write and no body
 * (a "content-" or "transfer-" header sends it to Envoy). Routes: first path
 * prefix match in dp_iroutes, for the active generation. The head is copied
 * into a per-CPU scratch and read with masked indices, so the verifier sees
 * one small state per loop round.
 */
#ifndef L7FP_DP_DECIDE_INLINE_H
#define L7FP_DP_DECIDE_INLINE_H

#ifndef DP_IROUTES
#define DP_IROUTES 8
#endif
#define DP_IPREFIX 32
#ifndef DP_IHDR_MAX
#define DP_IHDR_MAX 512 /* power of two */
#endif
#define DP_IMASK (DP_IHDR_MAX - 1)

struct dp_iroute {
    __u32 used;
    __u32 kind;      /* DP_K_FORWARD / DP_K_REPLY / DP_K_PASS (punt) */
    __u32 pool;      /* FORWARD: endpoint pool id */
    __u32 reply_id;  /* REPLY: index in dp_replies */
    __u32 status;    /* REPLY: status, for counters and the access log */
    __u32 plen;
    char prefix[DP_IPREFIX];
};

struct dp_iscratch {
    __u32 n;     /* bytes copied */
    __u32 head;  /* head length once CRLFCRLF is seen */
    __u32 bad;   /* PASS reason seen while scanning */
    __u32 pad;
    __u8 b[DP_IHDR_MAX + DP_IPREFIX];
};

/* index = gen * DP_IROUTES + i: two generations, the agent flips dp_cfg.gen last */
BPF_ARRAY(dp_iroutes, struct dp_iroute, 2 * DP_IROUTES);
BPF_PERCPU_ARRAY(dp_iscr, struct dp_iscratch, 1);

#define DP_IR_UNPARSED (DP_R_DECIDE_BASE + 1)
#define DP_IR_BODY (DP_R_DECIDE_BASE + 2)
#define DP_IR_NO_ROUTE (DP_R_DECIDE_BASE + 13)
#define DP_IR_PUNT (DP_R_DECIDE_BASE + 7)

/* Bytes and length of kernel reply `id` (sk_msg.c rewrites the request into it). */
static __always_inline __u8 *dp_reply_get(__u32 gen, __u32 id, __u32 *len)
{
    struct dp_reply *r = dp_replies.lookup(&id);
    if (!r)
        return 0;
    *len = r->len;
    return r->data;
}

static __always_inline int dp_decide(struct dp_conn *c, __u32 gen, void *data, void *data_end,
                                     struct dp_verdict *v)
{
    __u32 zero = 0;
    struct dp_iscratch *s = dp_iscr.lookup(&zero);
    if (!s) {
        v->kind = DP_K_PASS; v->reason = DP_IR_UNPARSED;
        return 0;
    }
    __u8 *p = data;
    s->n = 0;
    s->head = 0;
    s->bad = 0;
    for (__u32 i = 0; i < DP_IHDR_MAX; i++) {
        if ((void *)(p + i + 1) > data_end)
            break;
        s->b[i & DP_IMASK] = p[i];
        s->n = i + 1;
    }
    /* Scanner state lives in the scratch, not in registers (barrier): one
     * verifier state per round instead of one per combination of counters. */
    for (__u32 i = 4; i < DP_IHDR_MAX - 3; i++) {
        asm volatile("" ::: "memory");
        if (i + 4 > s->n || s->head || s->bad)
            break;
        __u8 ch = s->b[i & DP_IMASK];
        if (ch == '\n') {
            __u8 a = s->b[(i + 1) & DP_IMASK] | 0x20, b = s->b[(i + 2) & DP_IMASK] | 0x20;
            if ((a == 'c' && b == 'o') || (a == 't' && b == 'r'))
                s->bad = DP_IR_BODY; /* a body header: not for the inline path */
        } else if (ch == '\r' && s->b[(i + 1) & DP_IMASK] == '\n' &&
                   s->b[(i + 2) & DP_IMASK] == '\r' && s->b[(i + 3) & DP_IMASK] == '\n') {
            s->head = i + 4;
        }
    }
    asm volatile("" ::: "memory");
    __u32 n = s->n, head = s->head;
    if (s->bad) {
        v->kind = DP_K_PASS; v->reason = s->bad;
        return 0;
    }
    if (n < 18) {
        v->kind = DP_K_NEED_MORE; v->reason = DP_IR_UNPARSED;
        return 0;
    }
    if (s->b[0] != 'G' || s->b[1] != 'E' || s->b[2] != 'T' || s->b[3] != ' ' || s->b[4] != '/') {
        v->kind = DP_K_PASS; v->reason = DP_IR_UNPARSED;
        return 0;
    }
    if (!head) {
        v->kind = n >= DP_IHDR_MAX ? DP_K_PASS : DP_K_NEED_MORE;
        v->reason = DP_IR_UNPARSED;
        return 0;
    }
    v->consumed = head;
    v->head_len = head;
#pragma unroll
    for (__u32 r = 0; r < DP_IROUTES; r++) {
        __u32 idx = (gen & 1) * DP_IROUTES + r;
        struct dp_iroute *rt = dp_iroutes.lookup(&idx);
        if (!rt || !rt->used)
            break;
        int ok = 1;
        for (__u32 q = 0; q < DP_IPREFIX; q++) {
            if (q >= rt->plen)
                break;
            if (s->b[4 + q] != rt->prefix[q]) {
                ok = 0;
                break;
            }
        }
        if (!ok)
            continue;
        v->route = r + 1;
        v->kind = rt->kind;
        v->pool = rt->pool;
        v->reply_id = rt->reply_id;
        v->status = rt->status;
        v->reason = rt->kind == DP_K_PASS ? DP_IR_PUNT : 0;
        return 0;
    }
    v->kind = DP_K_PASS; v->reason = DP_IR_NO_ROUTE;
    return 0;
}

#endif
