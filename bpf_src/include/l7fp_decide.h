/* l7fp_decide: what to do with the HTTP/1.1 request at the head of a buffer.
 *
 * Owned by the decision engine (K1). Called by the data path's sk_msg program
 * (K2, sk_msg.c) on a client socket's message, and by the BPF_PROG_TEST_RUN
 * harness (test_decide.c). Contract: docs/contracts.md, "Kernel decision".
 *
 *   FORWARD   send out->consumed bytes (head + Content-Length body) to endpoint
 *             out->endpoint of cluster out->cluster; if out->hdr_add, insert
 *             l7fp_hdradds[gen * N + hdr_add - 1] at offset hdr_len - 2.
 *   REPLY     answer with the whole response in l7fp_replies[gen * N + reply];
 *             out->consumed bytes of the request are used up.
 *   NEED_MORE the head is not complete yet: cork.
 *   PASS      hand the connection to Envoy; out->reason says why.
 *
 * The caller sets ctx->rand, ctx->rand2, ctx->rand3, ctx->now_ns and ctx->gen
 * first. A FORWARD with L7FP_DF_LR in out->flags is a LEAST_REQUEST pick: the
 * caller counts the request in flight at l7fp_lr_slot(gen, cluster, endpoint)
 * until it ends (the data path: dp_decide_l7fp.h).
 */
#ifndef L7FP_DECIDE_H
#define L7FP_DECIDE_H

#include "l7fp_rbac.h"
#include "l7fp_query.h"

static __always_inline int l7fp_pass(struct l7fp_decision *out, __u32 why)
{
    out->verdict = L7FP_PASS;
    out->reason = why;
    return L7FP_PASS;
}

/* Replies come in pairs (fastpath.synth): the response at an even index, the
 * same without its body at the next one, which is what Envoy sends to HEAD. */
static __always_inline int l7fp_reply(struct l7fp_decision *out, __u32 status, __u32 reply,
                                      __u32 head)
{
    out->verdict = L7FP_REPLY;
    out->status = status;
    out->reply = reply + (head ? 1 : 0);
    return L7FP_REPLY;
}

/* Token bucket b: 1 if a token was taken, 0 if empty. Refilled lazily by whole
 * fill intervals; starts full like Envoy's. Races between CPUs may let a few
 * extra requests through at the edge; never fewer. */
static __always_inline int l7fp_take_token(struct l7fp_bucket *b, __u64 now)
{
    if (b->last_ns == 0) {
        b->tokens = b->max_tokens;
        b->last_ns = now;
    } else if (b->fill_interval_ns && now >= b->last_ns + b->fill_interval_ns) {
        __u64 k = (now - b->last_ns) / b->fill_interval_ns;
        __u64 t = b->tokens + k * b->tokens_per_fill;
        b->tokens = t > b->max_tokens ? b->max_tokens : t;
        b->last_ns += k * b->fill_interval_ns;
    }
    if (b->tokens == 0)
        return 0;
    __sync_fetch_and_add(&b->tokens, -1);
    return 1;
}

/* Rate limit with bucket index+1 `bucket`: 0 go on, else L7FP_REPLY/L7FP_PASS set. */
static __always_inline int l7fp_rate_limit(struct l7fp_req_ctx *c, __u32 bucket, __u32 gen,
                                           struct l7fp_decision *out)
{
#if L7FP_F_RATE_LIMIT
    if (!bucket)
        return 0;
    if (bucket > L7FP_N_BUCKETS)
        return l7fp_pass(out, L7FP_R_LIMIT);
    __u32 idx = l7fp_idx(gen, bucket - 1, L7FP_N_BUCKETS);
    struct l7fp_bucket *b = l7fp_buckets.lookup(&idx);
    if (!b)
        return l7fp_pass(out, L7FP_R_LIMIT);
    /* every request takes a token; an empty bucket rejects the enforced share */
    if (l7fp_take_token(b, c->now_ns))
        return 0;
    if (c->rand % 1000000 >= b->enforce_per_million)
        return 0;
    return l7fp_reply(out, b->status, b->reply, out->flags & L7FP_DF_HEAD);
#else
    return bucket ? l7fp_pass(out, L7FP_R_LIMIT) : 0;
#endif
}

/* Cluster of a FORWARD route (weighted: first entry whose running weight
 * exceeds rand % total). Returns the cluster id or -1. */
static __always_inline int l7fp_pick_cluster(struct l7fp_req_ctx *c, struct l7fp_route *rt,
                                             __u32 gen)
{
    if (!rt->n_wc)
        return rt->cluster;
#if L7FP_F_WEIGHTED
    if (!rt->total_weight || rt->n_wc > L7FP_MAX_WEIGHTED)
        return -1;
    __u32 pick = c->rand % rt->total_weight;
    for (__u32 j = 0; j < L7FP_MAX_WEIGHTED; j++) {
        if (j >= rt->n_wc)
            break;
        __u32 wi = rt->cluster + j;
        if (wi >= L7FP_N_WEIGHTED)
            return -1;
        __u32 idx = l7fp_idx(gen, wi, L7FP_N_WEIGHTED);
        struct l7fp_weighted *w = l7fp_weighted.lookup(&idx);
        if (!w)
            return -1;
        if (pick < w->cum_weight)
            return w->cluster;
    }
#endif
    return -1;
}

#if L7FP_F_LEAST_REQUEST
/* In-flight counter slot of endpoint e (< L7FP_LR_EPS) of cluster cid. */
static __always_inline __u32 l7fp_lr_slot(__u32 gen, __u32 cid, __u32 e)
{
    return l7fp_idx(gen, cid * L7FP_LR_EPS + e, L7FP_LR_SLOTS);
}

/* Requests in flight at slot s (l7fp_maps.h: the data path's count less the
 * agent's ends). */
static __always_inline __s64 l7fp_lr_load(__u32 s)
{
    __u64 *n = l7fp_lr_n.lookup(&s);
    __u64 *g = l7fp_lr_gone.lookup(&s);
    return (__s64)((n ? *n : 0) - (g ? *g : 0));
}

/* Envoy 1.40's unweighted LEAST_REQUEST pick (choice_count 2): two random
 * endpoints (rand2, rand3; the same one twice is possible), the one with fewer
 * requests in flight; a tie keeps the first draw. 0 ok, else PASS set. */
static __always_inline int l7fp_pick_lr(struct l7fp_req_ctx *c, __u32 cid, __u32 gen, __u32 n,
                                        struct l7fp_decision *out)
{
    if (n > L7FP_LR_EPS)
        return l7fp_pass(out, L7FP_R_LIMIT);
    __u32 a = c->rand2 % n, b = c->rand3 % n;
    if (l7fp_lr_load(l7fp_lr_slot(gen, cid, b)) < l7fp_lr_load(l7fp_lr_slot(gen, cid, a)))
        a = b;
    out->endpoint = a;
    out->flags |= L7FP_DF_LR;
    return 0;
}
#endif

/* Endpoint of cluster cid by its LB policy. 0 ok, else PASS set. */
static __always_inline int l7fp_pick_endpoint(struct l7fp_req_ctx *c, __u32 cid, __u32 gen,
                                              struct l7fp_decision *out)
{
    if (cid >= L7FP_N_CLUSTERS)
        return l7fp_pass(out, L7FP_R_LIMIT);
    __u32 idx = l7fp_idx(gen, cid, L7FP_N_CLUSTERS);
    struct l7fp_cluster *cl = l7fp_clusters.lookup(&idx);
    if (!cl)
        return l7fp_pass(out, L7FP_R_LIMIT);
    __u32 n = cl->n_endpoints;
    if (!n)
        return l7fp_pass(out, L7FP_R_NO_ENDPOINT);
    out->cluster = cid;
    if (cl->lb == L7FP_LB_ROUND_ROBIN) {
        __u32 *ctr = l7fp_rr.lookup(&idx);
        if (!ctr)
            return l7fp_pass(out, L7FP_R_LIMIT);
        /* read, then add without fetch: BCC's LLVM target has no fetch-add */
        __u32 v = *ctr;
        __sync_fetch_and_add(ctr, 1);
        out->endpoint = v % n;
    } else {
#if L7FP_F_LEAST_REQUEST
        if (cl->lb == L7FP_LB_LEAST_REQUEST && n > 1)
            return l7fp_pick_lr(c, cid, gen, n, out);
#endif
        out->endpoint = c->rand2 % n;
    }
    return 0;
}

/* Header adds: every name the plan sets (not appends) or removes must be
 * absent from the request, else Envoy does it. 0 ok, else PASS set. */
static __always_inline int l7fp_header_add(struct l7fp_req_ctx *c, __u32 add, __u32 gen,
                                           struct l7fp_decision *out)
{
    if (!add)
        return 0;
#if L7FP_F_HDR_ADD
    if (add > L7FP_N_HDRADDS)
        return l7fp_pass(out, L7FP_R_LIMIT);
    __u32 idx = l7fp_idx(gen, add - 1, L7FP_N_HDRADDS);
    struct l7fp_blob *b = l7fp_hdradds.lookup(&idx);
    if (!b || b->n_absent > L7FP_MAX_ABSENT)
        return l7fp_pass(out, L7FP_R_LIMIT);
#pragma unroll
    for (__u32 j = 0; j < L7FP_MAX_ABSENT; j++) {
        if (j < b->n_absent && c->r.slot_len[b->absent[j] & L7FP_SLOT_MASK])
            return l7fp_pass(out, L7FP_R_HDR_CONFLICT);
    }
    out->hdr_add = add;
    return 0;
#else
    return l7fp_pass(out, L7FP_R_LIMIT);
#endif
}

/* What the matched route rt does with the request (after the filters). */
static __always_inline int l7fp_act(struct l7fp_req_ctx *c, struct l7fp_route *rt, __u32 gen,
                                    struct l7fp_decision *out)
{
    __u32 head = out->flags & L7FP_DF_HEAD;
    if (rt->action == L7FP_ACT_REPLY)
        return l7fp_reply(out, rt->status, rt->reply, head);
    if (rt->action != L7FP_ACT_FORWARD)
        return l7fp_pass(out, L7FP_R_LIMIT);
    int cid = l7fp_pick_cluster(c, rt, gen);
    if (cid < 0)
        return l7fp_pass(out, L7FP_R_LIMIT);
    if (l7fp_pick_endpoint(c, cid, gen, out))
        return L7FP_PASS;
    if (l7fp_header_add(c, rt->hdr_add, gen, out))
        return L7FP_PASS;
    out->verdict = L7FP_FORWARD;
    return L7FP_FORWARD;
}

/* No virtual host or no route: Envoy's 404 from the kernel when the plan gives
 * the reply, else Envoy. */
static __always_inline int l7fp_nomatch(struct l7fp_listener *l, struct l7fp_decision *out,
                                        __u32 why)
{
    if (!l->nomatch)
        return l7fp_pass(out, why);
    return l7fp_reply(out, 404, l->nomatch - 1, out->flags & L7FP_DF_HEAD);
}

/* First matching route of vhost vi: the route, or NULL with out->verdict
 * still 0 (no route) or PASS set (limit hit, undecidable matcher). */
static __always_inline struct l7fp_route *l7fp_find_route(struct l7fp_req_ctx *c, __u32 vi,
                                                          __u32 gen, struct l7fp_decision *out)
{
    if (vi >= L7FP_N_VHOSTS) {
        l7fp_pass(out, L7FP_R_LIMIT);
        return NULL;
    }
    __u32 idx = l7fp_idx(gen, vi, L7FP_N_VHOSTS);
    struct l7fp_vhost *vh = l7fp_vhosts.lookup(&idx);
    if (!vh || vh->n_routes > L7FP_MAX_ROUTES) {
        l7fp_pass(out, L7FP_R_LIMIT);
        return NULL;
    }
    out->vhost = vi;
    for (__u32 i = 0; i < L7FP_MAX_ROUTES; i++) {
        if (i >= vh->n_routes)
            break;
        __u32 ri = vh->route_base + i;
        if (ri >= L7FP_N_ROUTES) {
            l7fp_pass(out, L7FP_R_LIMIT);
            return NULL;
        }
        __u32 ridx = l7fp_idx(gen, ri, L7FP_N_ROUTES);
        struct l7fp_route *rt = l7fp_routes.lookup(&ridx);
        if (!rt) {
            l7fp_pass(out, L7FP_R_LIMIT);
            return NULL;
        }
        int m = l7fp_route_match(c, rt, gen);
        if (m == 1)
            m = l7fp_query_match(c, rt, gen);
        if (m < 0) {
            out->route = rt->route_id;
            l7fp_pass(out, L7FP_R_HDR_CONFLICT);
            return NULL;
        }
        if (m) {
            out->route = rt->route_id;
            return rt;
        }
    }
    return NULL;
}

/* The policy filters (RBAC, local rate limit, fault abort) in the listener's HCM
 * order, for the matched route or none. 0 go on, else the verdict set. A
 * route's bucket replaces the listener's; a route's fault replaces the
 * HCM-level one. */
static __always_inline int l7fp_filters(struct l7fp_req_ctx *c, struct l7fp_listener *l,
                                        struct l7fp_route *rt, __u32 gen,
                                        struct l7fp_decision *out)
{
    __u32 order = l->order, head = out->flags & L7FP_DF_HEAD;
    /* RBAC has no side effect: evaluate every RBAC filter once here (not in
     * every unrolled filter slot), keep the answer in the scratch: bit f set
     * when filter f denies, 0x100 when the kernel cannot tell (PASS) */
    if (l->rbac_n) {
        int d = l7fp_rbac_denies(c, l, gen);
        c->r.rb_deny = d < 0 ? 0x100 : d;
    } else {
        c->r.rb_deny = 0;
    }
    L7FP_BARRIER();
#pragma unroll
    for (int j = 0; j < L7FP_MAX_FILTERS; j++) {
        __u32 f = (order >> (4 * j)) & 0xf;
        if (f == L7FP_FILT_RATE_LIMIT) {
            __u32 bucket = rt && rt->bucket ? rt->bucket : l->bucket;
            if (l7fp_rate_limit(c, bucket, gen, out))
                return out->verdict;
        } else if (f == L7FP_FILT_RBAC || f == L7FP_FILT_RBAC + 1) {
            __u32 deny = c->r.rb_deny;
            if (deny & 0x100)
                return l7fp_pass(out, L7FP_R_RBAC);
            if (deny & (1 << (f - L7FP_FILT_RBAC)))
                return l7fp_reply(out, 403, l->rbac_reply, head);
        } else if (f == L7FP_FILT_FAULT) {
#if L7FP_F_FAULT
            __u32 pm = rt ? rt->fault_per_million : l->fault_per_million;
            if (pm && c->rand % 1000000 < pm)
                return rt ? l7fp_reply(out, rt->fault_status, rt->fault_reply, head)
                          : l7fp_reply(out, l->fault_status, l->fault_reply, head);
#endif
        }
    }
    return 0;
}

/* Everything after the parse: listener, virtual host, route, filters, action.
 * `out` already holds the parse's fields (hdr_len, consumed, flags). */
static __always_inline int l7fp_decide_parsed(struct l7fp_req_ctx *ctx, __u32 listener_id,
                                              struct l7fp_decision *out)
{
    __u32 gen = ctx->gen & 1;
    if (listener_id >= L7FP_N_LISTENERS)
        return l7fp_pass(out, L7FP_R_NO_LISTENER);
    __u32 lidx = l7fp_idx(gen, listener_id, L7FP_N_LISTENERS);
    struct l7fp_listener *l = l7fp_listeners.lookup(&lidx);
    if (!l || (l->flags & L7FP_LF_PUNT))
        return l7fp_pass(out, L7FP_R_NO_LISTENER);
    /* a header Envoy strips, overwrites or acts on (l7fp_parse_header) */
    if (ctx->r.tflags & L7FP_TF_ENVOY_HDR)
        return l7fp_pass(out, L7FP_R_HDR_CONFLICT);
    if (ctx->r.tflags)
        return l7fp_pass(out, L7FP_R_PATH_NORM);
    l7fp_query_scan(ctx);
    int vi = l7fp_pick_vhost(ctx, l, gen);
    if (vi == -2)
        return l7fp_pass(out, L7FP_R_LIMIT);
    struct l7fp_route *rt = NULL;
    if (vi >= 0) {
        rt = l7fp_find_route(ctx, vi, gen, out);
        if (out->verdict)
            return out->verdict;
    }
    if (rt && rt->action == L7FP_ACT_PUNT)
        return l7fp_pass(out, L7FP_R_PUNT_ROUTE);
    if (l7fp_filters(ctx, l, rt, gen, out))
        return out->verdict;
    if (vi < 0)
        return l7fp_nomatch(l, out, L7FP_R_NO_VHOST);
    if (!rt)
        return l7fp_nomatch(l, out, L7FP_R_NO_ROUTE);
    return l7fp_act(ctx, rt, gen, out);
}

static __always_inline void l7fp_out_init(struct l7fp_decision *out, __u32 gen)
{
    __builtin_memset(out, 0, sizeof(*out));
    out->vhost = ~0U;
    out->route = ~0U;
    out->gen = gen;
}

static __always_inline int l7fp_decide(struct l7fp_req_ctx *ctx, void *data, void *data_end,
                                       __u32 listener_id, struct l7fp_decision *out)
{
    __u32 gen = ctx->gen & 1, why = 0;
    l7fp_out_init(out, gen);
    __u32 v = l7fp_parse(ctx, data, data_end, gen, &why);
    if (v == L7FP_NEED_MORE) {
        out->verdict = L7FP_NEED_MORE;
        return L7FP_NEED_MORE;
    }
    if (v)
        return l7fp_pass(out, why);
    out->hdr_len = ctx->r.hdr_len;
    out->body_len = ctx->r.cl;
    out->consumed = ctx->r.hdr_len + ctx->r.cl;
    if (ctx->r.method_len == 4 && ctx->r.method == L7FP_W_HEAD)
        out->flags |= L7FP_DF_HEAD;
    return l7fp_decide_parsed(ctx, listener_id, out);
}

/* A second decision on the request `first` was decided on (still parsed in
 * ctx->r), with another listener: the data path's destination-side (inbound)
 * listener. Same parse, so no NEED_MORE; the caller may set new ctx->rand*.
 * Called by the data path (dp_decide_l7fp.h) after a FORWARD. */
static __always_inline int l7fp_decide_again(struct l7fp_req_ctx *ctx, __u32 listener_id,
                                             struct l7fp_decision *first,
                                             struct l7fp_decision *out)
{
    l7fp_out_init(out, ctx->gen & 1);
    out->hdr_len = first->hdr_len;
    out->body_len = first->body_len;
    out->consumed = first->consumed;
    out->flags = first->flags & L7FP_DF_HEAD;
    return l7fp_decide_parsed(ctx, listener_id, out);
}

#endif /* L7FP_DECIDE_H */
