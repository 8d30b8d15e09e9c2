/* The data path's decision when a plan is compiled in: K1's l7fp_decide
 * (include/l7fp_decide.h) adapted to struct dp_verdict.
 *
 * Owner: K2 (this adapter only). (cluster id, endpoint index) of a FORWARD is
 * turned into the agent's upstream pool id through dp_eps, for the same plan
 * generation. Decision PASS reasons are counted as DP_R_DECIDE_BASE + reason.
 */
#ifndef L7FP_DP_DECIDE_L7FP_H
#define L7FP_DP_DECIDE_L7FP_H

#include "l7fp_decide.h"
#include "dp_hop.h" /* hop-by-hop request headers: dp_msg_act calls it */
/* The `trace` field of the request's listener (c->listener, the plan
 * generation of the decision): 0 without tracing, else sampling + 1, bit 16
 * set for the Zipkin tracer (fastpath/synth_tables.py). For
 * dp_xrid.h's dp_xrid_act; here because BCC rewrites map calls only in the
 * pasted text (an #included header's `.lookup` is left a call it cannot load). */
static __always_inline __u32 dp_trace_of(struct dp_conn *conn)
{
#if defined(DP_TRACE) && DP_TRACE
    struct l7fp_req_ctx *c = l7fp_ctx_get();
    __u32 lid = conn->listener - 1; /* dp_svc holds listener id + 1 */
    if (!c || lid >= L7FP_N_LISTENERS)
        return 0;
    __u32 idx = l7fp_idx(c->gen & 1, lid, L7FP_N_LISTENERS);
    struct l7fp_listener *l = l7fp_listeners.lookup(&idx);
    return l ? l->trace : 0;
#else
    return 0;
#endif
}

#include "dp_xrid.h" /* x-forwarded-proto, x-request-id: dp_msg_act calls it */

#ifndef DP_INBOUND
#define DP_INBOUND 0 /* 1: the destinations' inbound listeners are decided too (the agent
                      * sets it when the plan merged one: fastpath/inbound_merge.py) */
#endif

struct dp_ep_key {
    __u32 gen;
    __u32 cluster;
    __u32 endpoint;
};

BPF_HASH(dp_eps, struct dp_ep_key, __u32, 2 * 1024);
/* The same key -> inbound listener id + 1 of that endpoint's pod (its sidecar's
 * listener for the endpoint's port, merged into this node's plan by
 * fastpath/inbound_merge.py). No entry: the destination's inbound side forwards
 * everything unchanged, nothing to decide. */
BPF_HASH(dp_ep_in, struct dp_ep_key, __u32, 2 * 1024);

#if L7FP_MAX_BLOB != DP_REPLY_MAX
#error "DP_REPLY_MAX must equal L7FP_MAX_BLOB (fastpath/loader.py sets both)"
#endif

/* Request headers to add (l7fp_hdradds entry hdr_add - 1): "name: value\r\n"... */
static __always_inline __u8 *dp_hdr_add_get(__u32 gen, __u32 hdr_add, __u32 *len)
{
#if !L7FP_F_HDR_ADD
    return 0; /* compiled out: the plan adds no headers */
#endif
    if (!hdr_add)
        return 0;
    __u32 idx = l7fp_idx(gen, hdr_add - 1, L7FP_N_HDRADDS);
    struct l7fp_blob *b = l7fp_hdradds.lookup(&idx);
    if (!b)
        return 0;
    *len = b->len;
    return b->b;
}

/* Kernel replies come from the plan's l7fp_replies (dp_replies stays unused). */
static __always_inline __u8 *dp_reply_get(__u32 gen, __u32 id, __u32 *len)
{
    __u32 idx = l7fp_idx(gen, id, L7FP_N_REPLIES);
    struct l7fp_blob *b = l7fp_replies.lookup(&idx);
    if (!b)
        return 0;
    *len = b->len;
    return b->b;
}

/* The destination's inbound listener `lid` (id + 1, dp_ep_in) on a request
 * the outbound decision `d` forwards: the requests of the fast path never
 * pass the destination's sidecar (DESIGN.md rule 4). Only its effects on
 * the endpoint side count: RBAC 403, fault abort, direct response, 404 -> the
 * kernel replies as that sidecar would; header adds -> v->hdr_add_in; anything
 * it cannot decide (punt route, rate limit owned by Envoy) -> Envoy, which then
 * runs both sidecars. Its own cluster choice is ignored: the outbound one
 * stands. Returns 1 when v was changed to REPLY or PASS. */
static __always_inline int dp_decide_inbound(struct l7fp_req_ctx *ctx, struct l7fp_decision *d,
                                             __u32 lid, struct dp_verdict *v)
{
    if (!lid)
        return 0;
    struct l7fp_decision d2 = {};
    /* fresh draws: a fault percentage must not follow the weighted pick */
    ctx->rand = bpf_get_prandom_u32();
    ctx->rand2 = bpf_get_prandom_u32();
    l7fp_decide_again(ctx, lid - 1, d, &d2);
    if (d2.verdict == L7FP_FORWARD) {
        v->hdr_add_in = d2.hdr_add;
        return 0;
    }
    if (d2.verdict == L7FP_REPLY) {
        v->kind = DP_K_REPLY;
        v->reply_id = d2.reply;
        v->status = d2.status;
        return 1;
    }
    v->kind = DP_K_PASS;
    v->reason = DP_R_DECIDE_BASE + (d2.verdict == L7FP_PASS ? d2.reason : L7FP_R_LIMIT);
    return 1;
}

/* The outbound decision, per CPU rather than on the stack: with bookinfo-length
 * strings (L7FP_MAX_STR 64) dp_msg_verdict's frame is near the 512-byte limit.
 * With DP_INBOUND it is also kept for the inbound decision, which runs in a
 * program of its own (sk_msg.c dp_msg_in, a tail call): in one program with the
 * outbound decision the verifier walked two copies of the decision (~270k of
 * the 1M instructions it processes). Per CPU: sk_msg and its tail calls run on
 * one CPU. */
BPF_PERCPU_ARRAY(dp_dec_scr, struct l7fp_decision, 1);

#if DP_INBOUND
#define DP_DECIDE_SECOND 1

/* The inbound listener id + 1 of the endpoint the outbound decision (kept in
 * dp_dec_scr) forwards to, 0 when it has none: the request's one dp_ep_in
 * lookup (dp_msg_in, or dp_msg_rwin before it). */
static __always_inline __u32 dp_inbound_lid(__u32 gen)
{
    __u32 k0 = 0;
    struct l7fp_decision *d = dp_dec_scr.lookup(&k0);
    if (!d)
        return 0;
    struct dp_ep_key k = {.gen = gen & 1, .cluster = d->cluster, .endpoint = d->endpoint};
    __u32 *lid = dp_ep_in.lookup(&k);
    return lid ? *lid : 0;
}

/* Called by dp_msg_in on the verdict of a FORWARD: the destination's inbound
 * listener `lid` (dp_inbound_lid), on the request still parsed in the per-CPU
 * decision context. */
static __always_inline int dp_decide_second(__u32 gen, __u32 lid, struct dp_verdict *v)
{
    if (!lid)
        return 0;
    __u32 k = 0;
    struct l7fp_req_ctx *ctx = l7fp_ctx_get();
    struct l7fp_decision *d = dp_dec_scr.lookup(&k);
    if (!ctx || !d) {
        v->kind = DP_K_PASS;
        v->reason = DP_R_DECIDE_BASE + L7FP_R_LIMIT;
        return 1;
    }
    return dp_decide_inbound(ctx, d, lid, v);
}
#endif

/* LEAST_REQUEST's requests in flight (l7fp_maps.h l7fp_lr_n), the data path's
 * half. A request counts from its forward (dp_lr_sent, sk_msg.c dp_act_send:
 * the send on U succeeded) until its end, and dp_lr_busy[U] holds its slot
 * meanwhile: whoever deletes that record takes the request back, once:
 *   - the response path when the response is whole (dp_peer_val.left 0:
 *     Content-Length, chunked's last chunk, HEAD), or at its first write when
 *     the kernel cannot see its end (DP_LEFT_UNKNOWN: close-delimited, 1xx, a
 *     head over DP_RESP_HEAD): taken back then, it never leaks;
 *   - the client's close (sockops.c dp_release), U found gone at a forward
 *     (dp_act_send), the next request on U (dp_lr_sent: the last one's end
 *     was not seen);
 *   - the agent when it closes U (fastpath/loader.py drop_peer: timeouts,
 *     resets, the app's close, a retry's U, pools retired), counted in
 *     l7fp_lr_gone.
 * The slot is kept in the record, so a plan change takes a request back from
 * the slot it was counted in. Without L7FP_F_LEAST_REQUEST: no-ops. */
#if L7FP_F_LEAST_REQUEST
BPF_HASH(dp_lr_busy, __u64, __u32, DP_MAX_UP); /* upstream cookie -> l7fp_lr slot */

static __always_inline void dp_lr_end(__u64 up)
{
    __u32 *slot = dp_lr_busy.lookup(&up);
    if (!slot)
        return;
    __u32 s = *slot;
    if (dp_lr_busy.delete(&up) != 0)
        return; /* another path took it back first */
    __u64 *n = l7fp_lr_n.lookup(&s);
    if (n)
        __sync_fetch_and_add(n, -1);
}

/* A request of the outbound decision (dp_dec_scr, this CPU's: sk_msg and its
 * tail calls run on one CPU) was sent on U. */
static __always_inline void dp_lr_sent(__u64 up)
{
    __u32 k0 = 0;
    struct l7fp_decision *d = dp_dec_scr.lookup(&k0);
    if (!d || !(d->flags & L7FP_DF_LR) || d->endpoint >= L7FP_LR_EPS ||
        d->cluster >= L7FP_N_CLUSTERS)
        return;
    __u32 s = l7fp_lr_slot(d->gen, d->cluster, d->endpoint);
    dp_lr_end(up); /* the last request on U, if its end went unseen */
    __u64 *n = l7fp_lr_n.lookup(&s);
    if (!n || dp_lr_busy.update(&up, &s) != 0)
        return; /* not counted: nothing to take back */
    __sync_fetch_and_add(n, 1);
}

/* The response path after dp_close.h counted a write down (p: U's dp_peer). */
static __always_inline void dp_lr_response(__u64 up, struct dp_peer_val *p)
{
    __u32 left = p->left;
    if (left == 0 || left == DP_LEFT_UNKNOWN)
        dp_lr_end(up);
}
#else
static __always_inline void dp_lr_end(__u64 up) {}
static __always_inline void dp_lr_sent(__u64 up) {}
static __always_inline void dp_lr_response(__u64 up, struct dp_peer_val *p) {}
#endif

static __always_inline int dp_decide(struct dp_conn *c, __u32 gen, void *data, void *data_end,
                                     struct dp_verdict *v)
{
    struct l7fp_req_ctx *ctx = l7fp_ctx_get();
    __u32 k0 = 0;
    struct l7fp_decision *d = dp_dec_scr.lookup(&k0);
    if (!ctx || !d) {
        v->kind = DP_K_PASS;
        v->reason = DP_R_DECIDE_BASE + L7FP_R_LIMIT;
        return 0;
    }
    __builtin_memset(d, 0, sizeof(*d));
    ctx->rand = bpf_get_prandom_u32();
    ctx->rand2 = bpf_get_prandom_u32();
    ctx->rand3 = bpf_get_prandom_u32();
    ctx->gen = gen;
    ctx->now_ns = bpf_ktime_get_ns();
    ctx->src_ip4 = c->src_ip; /* the pod's address, as the destination sees it */
    /* dp_svc holds listener id + 1 (0: none); l7fp_decide counts from 0 */
    l7fp_decide(ctx, data, data_end, c->listener - 1, d);
    v->route = d->route == ~0u ? 0 : d->route + 1;
    v->consumed = d->consumed;
    v->head_len = d->hdr_len;
    v->status = d->status;
    v->cluster = d->cluster;
    v->od_host = 0;
    if (d->verdict == L7FP_FORWARD) {
        v->hdr_add = d->hdr_add; /* sk_msg.c inserts it (dp_hdr_add_get) */
        /* an ejected host is skipped before its pool is looked up (dp_outlier.h) */
        __u32 ep = d->endpoint;
        v->od_host = dp_outlier_pick(gen, d->cluster, &ep);
        if (v->od_host == DP_OD_NO_HOST) { /* no host left: Envoy's 503 (HEAD: no body) */
            v->od_host = 0;
            v->kind = DP_K_REPLY;
            v->reply_id = ep + ((d->flags & L7FP_DF_HEAD) ? 1 : 0);
            v->status = 503;
            return 0;
        }
        d->endpoint = ep;
        struct dp_ep_key k = {.gen = gen & 1, .cluster = d->cluster, .endpoint = d->endpoint};
        __u32 *pool = dp_eps.lookup(&k);
        if (!pool) {
            v->kind = DP_K_PASS;
            v->reason = DP_R_DECIDE_BASE + L7FP_R_POOL_EMPTY;
            return 0;
        }
        v->kind = DP_K_FORWARD;
        v->pool = *pool;
        return 0;
    }
    if (d->verdict == L7FP_REPLY) {
        v->kind = DP_K_REPLY;
        v->reply_id = d->reply;
        return 0;
    }
    if (d->verdict == L7FP_NEED_MORE) {
        v->kind = DP_K_NEED_MORE;
        return 0;
    }
    v->kind = DP_K_PASS;
    v->reason = DP_R_DECIDE_BASE + d->reason;
    return 0;
}

#endif
