/* L7FP plan tables as BPF maps (BCC macros).
 *
 * Owned by the decision engine (K1). Filled by the agent (K2) from
 * fastpath.synth's SynthesizedProgram.tables, keyed by these map names.
 * Every table holds two generations: entry (gen * N + i). The agent writes the
 * inactive generation, then flips the generation its data path passes in
 * l7fp_req_ctx.gen, so no request ever sees half a plan.
 */
#ifndef L7FP_MAPS_H
#define L7FP_MAPS_H

#include "l7fp_defs.h"

BPF_ARRAY(l7fp_listeners, struct l7fp_listener, 2 * L7FP_N_LISTENERS);
BPF_ARRAY(l7fp_domains, struct l7fp_domain, 2 * L7FP_N_DOMAINS);
BPF_ARRAY(l7fp_vhosts, struct l7fp_vhost, 2 * L7FP_N_VHOSTS);
BPF_ARRAY(l7fp_routes, struct l7fp_route, 2 * L7FP_N_ROUTES);
BPF_ARRAY(l7fp_hmatch, struct l7fp_hmatch, 2 * L7FP_N_HMATCH);
BPF_ARRAY(l7fp_weighted, struct l7fp_weighted, 2 * L7FP_N_WEIGHTED);
BPF_ARRAY(l7fp_clusters, struct l7fp_cluster, 2 * L7FP_N_CLUSTERS);
BPF_ARRAY(l7fp_replies, struct l7fp_blob, 2 * L7FP_N_REPLIES);
BPF_ARRAY(l7fp_hdradds, struct l7fp_blob, 2 * L7FP_N_HDRADDS);
BPF_ARRAY(l7fp_rbac, struct l7fp_rbac_row, 2 * L7FP_N_RBAC);
BPF_ARRAY(l7fp_buckets, struct l7fp_bucket, 2 * L7FP_N_BUCKETS);
BPF_ARRAY(l7fp_cclass, struct l7fp_cclass, 1);
BPF_ARRAY(l7fp_rr, __u32, 2 * L7FP_N_CLUSTERS);
#if L7FP_F_LEAST_REQUEST
/* Requests in flight per (generation, cluster, endpoint) slot of a LEAST_REQUEST
 * cluster (l7fp_lr_slot): l7fp_lr_n[s] - l7fp_lr_gone[s]. The data path adds 1
 * to l7fp_lr_n when it forwards a request there and 1 back when it sees the
 * request end (dp_decide_l7fp.h); the agent, which cannot add atomically,
 * counts the ends it sees (an upstream it closes) in l7fp_lr_gone, whose only
 * writer it is. Never rewritten at a plan change: a request counted in a slot
 * is taken back from that slot (the data path's record keeps the slot). */
#define L7FP_LR_SLOTS (L7FP_N_CLUSTERS * L7FP_LR_EPS)
BPF_ARRAY(l7fp_lr_n, __u64, 2 * L7FP_LR_SLOTS);
BPF_ARRAY(l7fp_lr_gone, __u64, 2 * L7FP_LR_SLOTS);
#endif
/* key.pad holds the generation */
BPF_HASH(l7fp_hnames, struct l7fp_hname_key, __u32, 2 * L7FP_MAX_SLOTS);
/* the scratch l7fp_decide works in; callers take entry 0 with l7fp_ctx_get() */
BPF_PERCPU_ARRAY(l7fp_scratch, struct l7fp_req_ctx, 1);

static __always_inline struct l7fp_req_ctx *l7fp_ctx_get(void)
{
    __u32 zero = 0;
    return l7fp_scratch.lookup(&zero);
}

/* Index of entry i of generation gen in a table of n entries per generation. */
static __always_inline __u32 l7fp_idx(__u32 gen, __u32 i, __u32 n)
{
    return (gen & 1) * n + i;
}

#endif /* L7FP_MAPS_H */
