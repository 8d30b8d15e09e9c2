/* Redirect routes (Envoy's RequestRedirect) answered without Envoy.
 *
 * Owner: the redirect part of K2 (fastpath/agent_redirect.py is its user-space
 * half). Pasted after dp_delay.h and before sk_msg.c (fastpath/loader.py).
 * Compiled in only with -DDP_REDIR=1, which the agent sets when a node's plan
 * has a KERNEL redirect route (fastpath.agent_redirect.needs_redirect); without
 * it every function here is empty and the map stays unused.
 *
 * The reply's Location is built from the request's Host, path and query, so no
 * fixed reply blob can carry it. The decision answers such a route with REPLY
 * and a placeholder reply (fastpath.synth_tables); dp_msg_act, on a REPLY
 * whose reply is the route's placeholder (dp_rdpol[(gen, route)]): the whole
 * request must be in this write and its head shorter than DP_REDIR_MAX, else
 * it goes to Envoy (DP_R_REDIR_HEAD); the head is copied into a DP_EV_REDIRECT
 * record of dp_events and the request is popped (the upstream never sees it).
 * The agent builds the reply (fastpath.reference.location, the one function
 * the reference model uses too) and injects it at once through its injector
 * socket (dp_inj slot 2). Counted kernel_reply/redirected.
 */
#ifndef L7FP_DP_REDIR_H
#define L7FP_DP_REDIR_H

#ifndef DP_REDIR
#define DP_REDIR 0
#endif
#define DP_REDIR_MAX 1024    /* a redirected request's head is shorter (power of 2) */
#define DP_EV_REDIRECT 8     /* a redirect route's request head: the agent answers */
#define DP_R_REDIR_HEAD 26   /* redirect route: request not whole in this write, or head too long */
#define DP_R_REDIRECTED 27   /* (outcome kernel_reply) answered by the agent */

struct dp_rdpol_key {
    __u32 gen;
    __u32 route; /* dp_verdict.route (route id + 1) */
};

/* A redirect route's placeholder reply (l7fp_replies index + 1), per generation. */
struct dp_rdpol {
    __u32 reply;
    __u32 _pad;
};

/* Ring buffer record (dp_events); `kind` first, as in struct dp_event. */
struct dp_redir_ev {
    __u32 kind;   /* DP_EV_REDIRECT */
    __u32 route;
    __u32 gen;
    __u32 len;    /* head bytes in `head` */
    __u64 cookie; /* client cookie */
    __u8 head[DP_REDIR_MAX];
};

BPF_HASH(dp_rdpol, struct dp_rdpol_key, struct dp_rdpol, 1024);

/* A REPLY (dp_msg_act): 1 answered by the agent (the request popped), 0 not a
 * redirect route's reply (reply now), -1 to Envoy (not whole, head too long,
 * ring buffer full, copy failed). */
static __always_inline int dp_redirect(struct sk_msg_md *msg, struct dp_conn *c,
                                       struct dp_verdict *v, __u32 gen, __u32 size)
{
#if DP_REDIR
    struct dp_rdpol_key k = {.gen = gen & 1, .route = v->route};
    struct dp_rdpol *p = dp_rdpol.lookup(&k);
    if (!p || (v->reply_id | 1) != ((p->reply - 1) | 1))
        return 0; /* the pair: the placeholder and its HEAD form */
    __u32 len = v->head_len;
    if (size != v->consumed || len == 0 || len >= DP_REDIR_MAX ||
        bpf_msg_pull_data(msg, 0, len, 0))
        return -1;
    struct dp_redir_ev *e = dp_events.ringbuf_reserve(sizeof(struct dp_redir_ev));
    if (!e)
        return -1;
    e->kind = DP_EV_REDIRECT;
    e->route = v->route;
    e->gen = gen & 1;
    e->len = len;
    e->cookie = c->cookie;
    void *d = msg->data;
    __u64 n = len;
    asm volatile("%0 &= %1" : "+r"(n) : "i"(DP_REDIR_MAX - 1)); /* the verifier's bound */
    if ((void *)(d + n) > msg->data_end || bpf_probe_read_kernel(e->head, n, d)) {
        dp_events.ringbuf_discard(e, 0);
        return -1;
    }
    if (bpf_msg_pop_data(msg, 0, size, 0)) {
        dp_events.ringbuf_discard(e, 0);
        return -1;
    }
    dp_events.ringbuf_submit(e, 0);
    return 1;
#else
    return 0;
#endif
}

#endif
