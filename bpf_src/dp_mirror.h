/* Request mirroring (Envoy's shadowing) in the data path.
 *
 * Owner: the mirror part of K2 (fastpath/agent_mirror.py is its user-space
 * half, fastpath/mirror.py the sans-I/O part). Pasted after dp_retry.h and
 * before sk_msg.c (fastpath/loader.py). Compiled in only with -DDP_MIRROR=1,
 * which the agent sets when a node's plan has a KERNEL route with a mirror
 * policy; without it every function here is empty and dp_mpol stays unused.
 *
 * At a FORWARD of a route with a policy in dp_mpol[(gen, route id)]:
 *  1. dp_msg_act checks that the whole request (head + body) is in this write
 *     and fits DP_MIRROR_MAX with the header inserts, else the request goes to
 *     Envoy (DP_R_MIRROR_COPY), which mirrors it itself: a request is mirrored
 *     by exactly one of the two paths.
 *  2. After the redirect succeeded (the request is on its way to the primary),
 *     each policy samples the request (its per-million fraction, one draw per
 *     policy as Envoy's runtime does); if any did, the request as forwarded is
 *     copied into a DP_EV_MIRROR record of its own ring buffer dp_mirror_rb (as
 *     long as the request, not DP_MIRROR_MAX: a burst fits), with the
 *     place of the destination's inbound header insert (which belongs to the
 *     primary's inbound sidecar, not to the shadow's: the agent cuts it out).
 *     A full ring buffer drops the shadow (shadow_lost/mirror_dropped), never the
 *     request: fire-and-forget, as Envoy's shadows.
 *  3. The agent sends the copy with `-shadow` appended to the host to an
 *     endpoint of each sampled policy's cluster and discards the response.
 */
#ifndef L7FP_DP_MIRROR_H
#define L7FP_DP_MIRROR_H

#ifndef DP_MIRROR
#define DP_MIRROR 0
#endif
#ifndef DP_MIRROR_MAX
#define DP_MIRROR_MAX 4096 /* a mirrored request is shorter (power of 2) */
#endif
#define DP_MIRRORS 4 /* mirror policies per route (fastpath.mirror.MIRRORS_MAX) */

#define DP_EV_MIRROR 6       /* a copy of a forwarded request to shadow */
#define DP_R_MIRROR_COPY 28  /* mirror route: request not whole in one write or too big */
#define DP_OUT_SHADOW_LOST 5 /* outcome of a shadow not posted (the request was forwarded:
                              * counted once as fast; this one counts shadows) */
#define DP_R_MIRROR_DROP 29  /* (outcome shadow_lost) ring buffer full, or copy failed */
#define DP_R_MIRROR_IN 30    /* mirror route answered by the destination's inbound policy */

struct dp_mpol_key {
    __u32 gen;
    __u32 route; /* dp_verdict.route (route id + 1) */
};

/* A route's mirror policies (written by the agent per plan generation). */
struct dp_mpol {
    __u32 n;
    __u32 per_million[DP_MIRRORS];
};

/* Ring buffer record (dp_events); `kind` first, as in struct dp_event. */
struct dp_mirror_ev {
    __u32 kind;    /* DP_EV_MIRROR */
    __u32 route;
    __u32 gen;
    __u32 mask;    /* bit i: policy i sampled the request */
    __u32 len;     /* bytes in req */
    __u32 cut_at;  /* the inbound header insert to remove: offset ... */
    __u32 cut_len; /* ... and length (0: none) */
    __u32 _pad;
    __u8 req[DP_MIRROR_MAX];
};

BPF_HASH(dp_mpol, struct dp_mpol_key, struct dp_mpol, 1024);
#if DP_MIRROR
/* The copies go through a ring buffer of their own, as records of their own
 * length: a burst of shadows must never crowd out dp_events (a lost CLOSE
 * would leak the client's upstream sockets). The record is built per CPU. */
BPF_RINGBUF_OUTPUT(dp_mirror_rb, 128); /* 512 kB */
BPF_PERCPU_ARRAY(dp_mirror_tmp, struct dp_mirror_ev, 1);
#endif

/* 1 when the decided route mirrors (its policy is in dp_mpol). */
static __always_inline int dp_mirror_route(__u32 gen, __u32 route)
{
#if DP_MIRROR
    struct dp_mpol_key k = {.gen = gen & 1, .route = route};
    return dp_mpol.lookup(&k) != 0;
#else
    return 0;
#endif
}

/* After the destination's inbound decision (dp_msg_in): when it answers a
 * request of a mirror route (RBAC deny, fault, direct response), Envoy still
 * shadows it (the outbound router sent it, the inbound sidecar answered), so
 * the request goes to Envoy, which does both. */
static __always_inline void dp_mirror_inbound(__u32 gen, struct dp_verdict *v)
{
    if (v->kind == DP_K_REPLY && dp_mirror_route(gen, v->route)) {
        v->kind = DP_K_PASS;
        v->reason = DP_R_MIRROR_IN;
    }
}

/* Bit i set when policy i samples this request. */
static __always_inline __u32 dp_mirror_sample(__u32 gen, __u32 route)
{
    struct dp_mpol_key k = {.gen = gen & 1, .route = route};
    struct dp_mpol *p = dp_mpol.lookup(&k);
    if (!p)
        return 0;
    __u32 mask = 0;
#pragma unroll
    for (int i = 0; i < DP_MIRRORS; i++) {
        if (i < p->n && bpf_get_prandom_u32() % 1000000 < p->per_million[i])
            mask |= 1u << i;
    }
    return mask;
}

/* Post the copy of the forwarded request (its first `len` bytes, header
 * inserts included) for the agent. Called after the redirect: the message's
 * bytes are still ours until the program returns. */
static __always_inline void dp_mirror_post(struct sk_msg_md *msg, struct dp_verdict *v,
                                           __u32 gen, __u32 len)
{
#if DP_MIRROR
    __u32 mask = dp_mirror_sample(gen, v->route);
    if (!mask)
        return;
    if (len == 0 || len >= DP_MIRROR_MAX || bpf_msg_pull_data(msg, 0, len, 0))
        goto lost;
    __u32 out_len = 0, in_len = 0;
    if (v->hdr_add_in) {
        dp_hdr_add_get(gen, v->hdr_add, &out_len); /* 0 when none */
        dp_hdr_add_get(gen, v->hdr_add_in, &in_len);
    }
    __u32 k0 = 0;
    struct dp_mirror_ev *e = dp_mirror_tmp.lookup(&k0);
    if (!e)
        goto lost;
    e->kind = DP_EV_MIRROR;
    e->route = v->route;
    e->gen = gen & 1;
    e->mask = mask;
    e->len = len;
    e->cut_at = v->head_len - 2 + out_len;
    e->cut_len = in_len;
    void *d = msg->data;
    __u64 n = len;
    /* len < DP_MIRROR_MAX already; the mask in asm, so clang cannot drop it,
     * gives the verifier that bound on the register it passes */
    asm volatile("%0 &= %1" : "+r"(n) : "i"(DP_MIRROR_MAX - 1));
    if ((void *)(d + n) > msg->data_end || bpf_probe_read_kernel(e->req, n, d))
        goto lost;
    /* the header and the request's bytes only: a 300-byte request takes 332 */
    if (dp_mirror_rb.ringbuf_output(e, __builtin_offsetof(struct dp_mirror_ev, req) + n, 0))
        goto lost;
    return;
lost:
    dp_count(v->route, DP_OUT_SHADOW_LOST, DP_R_MIRROR_DROP);
#endif
}

#endif
