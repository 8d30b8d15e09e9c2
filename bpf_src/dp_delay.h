/* Fault delay in the data path: a sampled share of a route's requests waits
 * the fault filter's fixed delay before the upstream sees it.
 *
 * Owner: the fault-delay part of K2 (fastpath/agent_delay.py is its user-space
 * half). Pasted after dp_retry.h and before sk_msg.c (fastpath/loader.py).
 * Compiled in only with -DDP_DELAY=1, which the agent sets when a node's plan
 * has a KERNEL route with a fault delay (fastpath.classify_delay); without it
 * every function here is empty and the maps stay unused.
 *
 * How (Envoy's fault filter: sample, hold the request, then the router sends it):
 *  1. dp_msg_act, FORWARD of a route in dp_dpol: the whole request (head +
 *     Content-Length body) must be in this write, else it goes to Envoy
 *     (DP_R_DELAY_BODY), whatever the draw would have been, so Envoy samples
 *     it once. Checked before the draw.
 *  2. After every reason to hand the request to Envoy was checked (bind, header
 *     inserts), the draw: bpf_get_prandom_u32() % 1e6 < per_million. On a hit
 *     the request (header inserts included) is redirected into the bound
 *     upstream U's own receive queue (msg_redirect_hash(BPF_F_INGRESS) to
 *     dp_up, as retries divert responses), recorded in dp_dly[U] (client, time,
 *     length, delay) and the agent is told (DP_EV_DELAY).
 *  3. The agent reads exactly that many bytes from U, waits until the record's
 *     time + delay and writes them to U: the app gets the request, its response
 *     takes the usual way to the client. A client that closes meanwhile cancels
 *     it (Envoy: the request never reaches the upstream).
 * A delay with an abort (Envoy: the abort is drawn after the delay, its reply
 * comes after it): the decision drew the abort; a REPLY that is the route's
 * fault abort is drawn for the delay too (independent draws, as Envoy's), and
 * on a hit the request is dropped and the agent injects the reply after the
 * delay (DP_EV_DELAY_REPLY, its injector socket in dp_inj slot 1).
 */
#ifndef L7FP_DP_DELAY_H
#define L7FP_DP_DELAY_H

#ifndef DP_DELAY
#define DP_DELAY 0
#endif

#define DP_EV_DELAY 5      /* a request was held for a fault delay: the agent sends it later */
#define DP_EV_DELAY_REPLY 7 /* a fault abort held for the delay: the agent injects the reply */
#define DP_R_DELAY_BODY 20 /* delay route: the request is not whole in this write */
#define DP_R_DELAYED 21    /* (outcome fast) held for the route's fault delay */
#define DP_R_DELAY_INBOUND 22 /* delay route answered by the destination's inbound policy */

struct dp_dpol_key {
    __u32 gen;
    __u32 route; /* dp_verdict.route (route id + 1) */
};

/* A route's fault delay (written by the agent per plan generation). */
struct dp_dpol {
    __u32 per_million;
    __u32 delay_ms;
    __u32 abort_reply; /* the route's fault abort reply (l7fp_replies index) + 1, 0: none */
    __u32 _pad;
};

/* A request held on U (key: U's cookie) until the agent sends it. */
struct dp_dly {
    __u64 client;   /* client cookie */
    __u64 t_ns;     /* bpf_ktime_get_ns() at the decision (CLOCK_MONOTONIC) */
    __u32 len;      /* request bytes in U's receive queue */
    __u32 delay_ms;
    __u32 route;
    __u32 _pad;
};

BPF_HASH(dp_dpol, struct dp_dpol_key, struct dp_dpol, 1024);
BPF_HASH(dp_dly, __u64, struct dp_dly, DP_MAX_UP);

/* 1 when the decided route has a fault delay in generation `gen`. */
static __always_inline int dp_delay_route(__u32 gen, struct dp_verdict *v)
{
#if DP_DELAY
    struct dp_dpol_key k = {.gen = gen & 1, .route = v->route};
    return dp_dpol.lookup(&k) != 0;
#else
    return 0;
#endif
}

/* The draw: the delay in ms for this request, or 0 (not delayed). */
static __always_inline __u32 dp_delay_sample(__u32 gen, struct dp_verdict *v)
{
#if DP_DELAY
    struct dp_dpol_key k = {.gen = gen & 1, .route = v->route};
    struct dp_dpol *p = dp_dpol.lookup(&k);
    if (!p || bpf_get_prandom_u32() % 1000000 >= p->per_million)
        return 0;
    return p->delay_ms ? p->delay_ms : 0;
#else
    return 0;
#endif
}

/* Hold the request on U: record, event, redirect into U's receive queue.
 * Returns SK_PASS, or SK_DROP when the redirect failed (U gone: the caller
 * sends the request to Envoy, which samples it afresh). */
static __always_inline int dp_delay_hold(struct sk_msg_md *msg, struct dp_conn *c, __u64 up,
                                         __u32 ms, __u32 len, __u32 route)
{
#if DP_DELAY
    struct dp_dly d = {.client = c->cookie, .t_ns = bpf_ktime_get_ns(), .len = len,
                       .delay_ms = ms, .route = route};
    if (dp_dly.update(&up, &d) != 0)
        return SK_DROP;
    int ret = dp_up.msg_redirect_hash(msg, &up, BPF_F_INGRESS);
    if (ret != SK_PASS) {
        dp_dly.delete(&up);
        return ret;
    }
    struct dp_event *e = dp_events.ringbuf_reserve(sizeof(struct dp_event));
    if (e) {
        __builtin_memset(e, 0, sizeof(*e));
        e->kind = DP_EV_DELAY;
        e->route = route;
        e->cookie = c->cookie;
        e->up_cookies[0] = up;
        dp_events.ringbuf_submit(e, 0);
    }
    return ret;
#else
    return SK_DROP;
#endif
}

/* dp_msg_in, after the destination's inbound decision: a reply of that
 * decision (RBAC deny, inbound fault, ...) to a request of a delay route goes
 * to Envoy. Envoy's client sidecar delays (sampled) before the destination's
 * sidecar answers; the kernel's reply cannot wait, so Envoy samples and answers
 * it (the hand-over does not depend on a draw: each request is delayed with
 * the configured probability, once). */
static __always_inline void dp_delay_inbound(__u32 gen, struct dp_verdict *v)
{
#if DP_DELAY
    if (v->kind == DP_K_REPLY && dp_delay_route(gen, v)) {
        v->kind = DP_K_PASS;
        v->reason = DP_R_DELAY_INBOUND;
    }
#endif
}

/* A REPLY of a delay route (dp_msg_act): 1 held (the request dropped, the
 * agent injects the reply after the delay), 0 reply now (not the route's fault
 * abort, or not drawn), -1 to Envoy (the request is not whole in this write:
 * the same rule as a forward of the route, so every such request is Envoy's). */
static __always_inline int dp_delay_reply(struct sk_msg_md *msg, struct dp_conn *c,
                                          struct dp_verdict *v, __u32 gen, __u32 size)
{
#if DP_DELAY
    struct dp_dpol_key k = {.gen = gen & 1, .route = v->route};
    struct dp_dpol *p = dp_dpol.lookup(&k);
    if (!p || !p->abort_reply || (v->reply_id | 1) != ((p->abort_reply - 1) | 1))
        return 0; /* the pair: the reply and its HEAD form */
    if (size != v->consumed)
        return -1;
    if (bpf_get_prandom_u32() % 1000000 >= p->per_million)
        return 0;
    struct dp_event *e = dp_events.ringbuf_reserve(sizeof(struct dp_event));
    if (!e)
        return 0; /* cannot tell the agent: the reply now */
    if (bpf_msg_pop_data(msg, 0, size, 0)) {
        dp_events.ringbuf_discard(e, 0);
        return -1;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->kind = DP_EV_DELAY_REPLY;
    e->route = v->route;
    e->cookie = c->cookie;
    e->ts_ns = bpf_ktime_get_ns();
    e->status = v->status;
    e->bytes = v->reply_id;
    e->pool = p->delay_ms;
    e->reason = gen & 1;
    dp_events.ringbuf_submit(e, 0);
    return 1;
#else
    return 0;
#endif
}

#endif
