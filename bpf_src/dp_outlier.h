/* Outlier detection on kernel routes: the kernel half (consecutive errors,
 * immediate ejection, the LB's skip of ejected hosts, panic).
 *
 * Owner: NAME=outlier. Pasted after dp_reset.h by fastpath/loader.py; compiled
 * in only with -DDP_OUTLIER=1 (fastpath.agent_outlier.needs_outlier(plan)).
 * The agent half (fastpath/agent_outlier.py) owns time: unejection at the
 * interval ticks, the ejection multiplier, `allowed` (max_ejection_percent), and
 * the maps' configuration. Envoy's rules: fastpath/outlier.py.
 *
 * Per request: dp_decide calls dp_outlier_pick after l7fp_decide's FORWARD
 * (an array lookup of the cluster, one of its detector; a host lookup only
 * while a host of the detector is ejected), sk_msg stores the host slot in
 * dp_peer's value with the wait bit (dp_reset_wait), and the first response
 * write (dp_srv_verdict, dp_skb_verdict) counts its status, read from the
 * head dp_close.h copied, into the host (dp_outlier_response:
 * atomic adds on the host's entry; at a threshold the ejection, seen by the
 * next pick on any CPU).
 */
#ifndef L7FP_DP_OUTLIER_H
#define L7FP_DP_OUTLIER_H

#ifndef DP_OUTLIER
#define DP_OUTLIER 0
#endif
#ifndef DP_OD_CLUSTERS
#define DP_OD_CLUSTERS 256 /* cluster ids per generation */
#endif
#ifndef DP_OD_EPS
#define DP_OD_EPS 16 /* endpoints per cluster (fastpath.outlier.MAX_HOSTS) */
#endif
#ifndef DP_OD_HOSTS
#define DP_OD_HOSTS 1024 /* (cluster, host) slots */
#endif
#ifndef DP_OD_DETS
#define DP_OD_DETS 256 /* detectors (clusters with outlier detection) */
#endif

/* (gen, cluster id), written by the agent per plan generation. */
struct dp_od_cluster {
    __u32 det;  /* detector id + 1; 0: no outlier detection */
    __u32 n;    /* endpoints (l7fp_decide's endpoint indexes) */
    __u32 rr;   /* 1: round robin, else random */
    __u32 ctr;  /* round-robin counter of the re-pick among healthy hosts */
    __u32 reply; /* l7fp_replies index + 1 of Envoy's 503 "no healthy upstream"; 0: panic > 0 */
    __u32 _pad;
    __u16 host[DP_OD_EPS]; /* endpoint index -> host slot */
};

#define DP_OD_NO_HOST 0xffffffffu /* dp_outlier_pick: no healthy host and no panic */

/* One detector (a cluster by name), across generations. Two views of a host,
 * as in Envoy: the detector's (`ejected`, at once) and the load balancer's
 * (`lb_out`): Envoy hands a health change to its workers' LBs at once only when
 * the cluster's last such update is older than common_lb_config
 * update_merge_window (1 s); else it is merged and delivered when the window
 * ends (ClusterManagerImpl::scheduleUpdate). The agent delivers merged ones.
 *
 * Who writes what: the counts (`ejected`, `lb_out`) only change by atomic adds
 * that follow a host's own flag flip (xchg), by the kernel and by the agent's
 * ops (dp_od_ops) alike, so neither can undo the other's; `allowed`, `total`,
 * `panic`, `window_ns` are the agent's (DP_OD_OP_DET); `pending`, `last_ns`,
 * `due_ns` are written by both, only in place (never from a copy). The 64-bit
 * counts are what BPF's fetching atomics need here. */
struct dp_od_det {
    __u64 ejected; /* hosts ejected now */
    __u64 lb_out;  /* hosts the LB skips (delivered ejections) */
    __u32 allowed; /* ejections allowed at once (max_ejection_percent) */
    __u32 total;   /* hosts */
    __u32 panic;   /* healthy_panic_threshold in percent */
    __u32 pending; /* 1: a merged update is due at due_ns (the agent delivers it) */
    __u64 window_ns; /* update_merge_window, 0: every change at once */
    __u64 last_ns;   /* the last delivered update */
    __u64 due_ns;
};

/* One (cluster, host). `ejected` and `lb_out` flip only by xchg (64 bits for
 * BPF's xchg), so the detector's counts follow each flip exactly once. */
struct dp_od_host {
    __u32 c5xx;     /* consecutive 5xx */
    __u32 cgw;      /* consecutive 502/503/504 */
    __u32 t5xx;     /* thresholds (agent), 0: not enforced */
    __u32 tgw;
    __u64 ejected;  /* 1: out of the detector (kernel sets, agent clears) */
    __u64 lb_out;   /* 1: the LB skips it (the delivered view of `ejected`) */
    __u64 ej_ns;    /* bpf_ktime_get_ns() of the ejection */
    __u32 det;      /* detector id; DP_OD_DETS: none (a host that left its cluster) */
    __u32 ejections; /* kernel ejections (counter) */
    __u32 overflow;  /* a threshold reached, max_ejection_percent said no */
    __u32 kind;      /* last ejection: 1 consecutive 5xx, 2 gateway failure, 3 local origin */
    __u32 clo;       /* consecutive local-origin failures (split_external_local_origin_errors) */
    __u32 tlo;       /* their threshold (agent), 0: not split or not enforced */
};

BPF_ARRAY(dp_odc, struct dp_od_cluster, 2 * DP_OD_CLUSTERS);
BPF_ARRAY(dp_odd, struct dp_od_det, DP_OD_DETS);
BPF_ARRAY(dp_odh, struct dp_od_host, DP_OD_HOSTS);

#if DP_OUTLIER
/* The k-th (0-based) endpoint of `c` whose host is not ejected, or -1. */
static __always_inline int dp_od_kth_healthy(struct dp_od_cluster *c, __u32 k)
{
    __u32 seen = 0;
#pragma unroll
    for (__u32 j = 0; j < DP_OD_EPS; j++) {
        if (j >= c->n)
            break;
        __u32 slot = c->host[j];
        struct dp_od_host *h = dp_odh.lookup(&slot);
        if (!h || h->lb_out)
            continue;
        if (seen == k)
            return j;
        seen++;
    }
    return -1;
}

/* After l7fp_decide picked endpoint *ep of cluster `cid`: while a host is out
 * of the LB, pick among the others as Envoy's LB does over its healthy set
 * (round robin with the cluster's own counter, else random), unless in panic
 * (every host). Returns the chosen host's slot + 1, 0 when the cluster has no
 * outlier detection, DP_OD_NO_HOST when no host is left (*ep: the reply). */
static __always_inline __u32 dp_outlier_pick(__u32 gen, __u32 cid, __u32 *ep)
{
    if (cid >= DP_OD_CLUSTERS)
        return 0;
    __u32 ci = (gen & 1) * DP_OD_CLUSTERS + cid;
    struct dp_od_cluster *c = dp_odc.lookup(&ci);
    if (!c || !c->det || *ep >= DP_OD_EPS || *ep >= c->n)
        return 0;
    __u32 slot = c->host[*ep & (DP_OD_EPS - 1)];
    __u32 di = c->det - 1;
    struct dp_od_det *d = dp_odd.lookup(&di);
    if (!d || !d->lb_out)
        return slot + 1; /* the common case: nothing ejected */
    __u32 total = d->total, ej = d->lb_out;
    __u32 healthy = total > ej ? total - ej : 0;
    if (!healthy && c->reply) {
        *ep = c->reply - 1; /* healthy_panic_threshold 0: Envoy answers 503 itself */
        return DP_OD_NO_HOST;
    }
    if (healthy * 100 < d->panic * total || !healthy)
        return slot + 1; /* panic: every host */
    __u32 k;
    if (c->rr) {
        k = c->ctr;
        __sync_fetch_and_add(&c->ctr, 1);
    } else {
        k = bpf_get_prandom_u32(); /* random over the healthy hosts */
    }
    int j = dp_od_kth_healthy(c, k % healthy);
    if (j < 0)
        return slot + 1; /* the LB view changed under us: keep the pick */
    *ep = (__u32)j;
    return c->host[j & (DP_OD_EPS - 1)] + 1;
}

/* Host `h` in or out of the LB's view: the detector's count follows the
 * flag's flip (xchg: once, whoever flips it). */
static __always_inline void dp_od_lb_set(struct dp_od_det *d, struct dp_od_host *h, __u64 v)
{
    if (__sync_lock_test_and_set(&h->lb_out, v) != v)
        __sync_fetch_and_add(&d->lb_out, v ? 1 : (__u64)-1);
}

/* A health change at `now` under the merge rule: 1 when it reaches the LB at
 * once (the last delivered update is older than the window; a merged one
 * pending goes with it), else 0 and the update is merged (pending). */
static __always_inline int dp_od_merge(struct dp_od_det *d, __u64 now)
{
    if (!d->window_ns || (__s64)(now - d->last_ns) > (__s64)d->window_ns) {
        d->last_ns = now;
        return 1;
    }
    if (!d->pending) { /* merged: the agent delivers it when the window ends */
        d->due_ns = now + d->window_ns;
        d->pending = 1;
    }
    return 0;
}

/* Eject host `h` (slot's entry) if its detector has room. */
static __always_inline void dp_od_eject(struct dp_od_host *h, __u32 kind)
{
    if (h->ejected)
        return; /* both counters at once */
    __u32 di = h->det;
    struct dp_od_det *d = dp_odd.lookup(&di);
    if (!d)
        return;
    if (__sync_fetch_and_add(&d->ejected, 1) >= d->allowed) {
        __sync_fetch_and_add(&d->ejected, (__u64)-1); /* no room (max_ejection_percent) */
        __sync_fetch_and_add(&h->overflow, 1);
        return;
    }
    __u64 now = bpf_ktime_get_ns();
    h->ej_ns = now;
    h->kind = kind;
    if (__sync_lock_test_and_set(&h->ejected, 1)) {
        __sync_fetch_and_add(&d->ejected, (__u64)-1); /* another CPU ejected it first */
        return;
    }
    __sync_fetch_and_add(&h->ejections, 1);
    if (dp_od_merge(d, now)) {
        dp_od_lb_set(d, h, 1); /* out of the merge window: the next pick skips it */
        if (d->pending)
            d->due_ns = now; /* Envoy delivers the merged ones too: the agent, at once */
    }
}

/* Count a response status into host slot + 1 `host1` (Envoy's
 * putHttpResponseCode): called once per request, on its first response write. */
static __always_inline void dp_outlier_status(__u32 host1, __u32 status)
{
    __u32 slot = host1 - 1;
    struct dp_od_host *h = dp_odh.lookup(&slot);
    if (!h || h->ejected)
        return; /* ejected (a panic pick): Envoy ignores its counts until unejection */
    if (status < 500 || status > 599) {
        if (h->c5xx)
            h->c5xx = 0;
        if (h->cgw)
            h->cgw = 0;
        return;
    }
    if (status >= 502 && status <= 504) {
        __sync_fetch_and_add(&h->cgw, 1);
        if (h->tgw && h->cgw >= h->tgw) {
            h->cgw = 0;
            dp_od_eject(h, 2);
        }
    } else if (h->cgw) {
        h->cgw = 0;
    }
    __sync_fetch_and_add(&h->c5xx, 1);
    if (h->t5xx && h->c5xx >= h->t5xx) {
        h->c5xx = 0;
        dp_od_eject(h, 1);
    }
}

/* A local-origin event of host slot + 1 `host1` of a cluster with
 * split_external_local_origin_errors (Envoy's putResultWithLocalExternalSplit):
 * `failed` 0 is an attempt that got its connection (LocalOriginConnectSuccess:
 * the count goes to 0), 1 a connect failure, timeout or reset
 * (localOriginFailure). Neither touches the 5xx/gateway counters. */
static __always_inline void dp_outlier_local(__u32 host1, __u32 failed)
{
    __u32 slot = host1 - 1;
    struct dp_od_host *h = dp_odh.lookup(&slot);
    if (!h || !h->tlo || h->ejected)
        return; /* not split (or not enforced), or ejected: as dp_outlier_status */
    if (!failed) {
        if (h->clo)
            h->clo = 0;
        return;
    }
    __sync_fetch_and_add(&h->clo, 1);
    if (h->clo >= h->tlo) {
        h->clo = 0;
        dp_od_eject(h, 3);
    }
}

/* sk_msg (dp_act_send) sent a request on U to host slot + 1 `host1`: that
 * attempt has its connection (Envoy: the pool is ready). */
static __always_inline void dp_outlier_sent(__u32 host1)
{
    if (host1)
        dp_outlier_local(host1, 0);
}

/* Count the status of a response whose first 12 bytes are d ("HTTP/1.1 503");
 * anything else is not a status line and is not counted. */
static __always_inline void dp_outlier_status_line(__u32 host1, const __u8 *d)
{
    if (d[0] != 'H' || d[4] != '/' || d[8] != ' ')
        return;
    __u8 a = d[9], b = d[10], c = d[11];
    if (a < '0' || a > '9' || b < '0' || b > '9' || c < '0' || c > '9')
        return;
    dp_outlier_status(host1, (a - '0') * 100 + (b - '0') * 10 + (c - '0'));
}

/* The agent's changes to host and detector records (fastpath.agent_outlier),
 * applied in place with the same code and atomics as the response path: the
 * agent never writes a record back from a stale copy, so a kernel ejection,
 * count or merge mark between its read and its write is never undone. */
#define DP_OD_OP_STATUS 1  /* a response the kernel did not see (Envoy's, the agent's) */
#define DP_OD_OP_UNEJECT 2 /* the tick: back in the detector, counters zeroed */
#define DP_OD_OP_DELIVER 3 /* the LB's view of the host catches up with `ejected` (if `go`) */
#define DP_OD_OP_CFG 4     /* thresholds a, b and detector id `det` */
#define DP_OD_OP_DET 5     /* detector `det`: allowed a, total b, panic c, window ns */
#define DP_OD_OP_CHANGE 6  /* unejections at `ns` under the merge rule: sets `go` */
#define DP_OD_OP_DUE 7     /* the merged update of `det`, if due at `ns`: sets `go` */
#define DP_OD_OP_LEAVE 8   /* the host left its cluster: out of both views, no detector */
#define DP_OD_OP_LOCAL 9   /* a local-origin event a (0 connected, 1 failed) the kernel did not see */
#ifndef DP_OD_BATCH
#define DP_OD_BATCH 64     /* ops per BPF_PROG_TEST_RUN */
#endif

struct dp_od_op {
    __u16 op;
    __u16 slot;
    __u16 det;
    __u16 c;   /* DET: healthy_panic_threshold percent; CFG: consecutive_local_origin_failure */
    __u32 a;   /* STATUS: the status; CFG: consecutive_5xx threshold; DET: allowed */
    __u32 b;   /* CFG: consecutive_gateway_failure threshold; DET: total */
    __u64 ns;  /* DET: update_merge_window; CHANGE, DUE: the agent's now (CLOCK_MONOTONIC) */
};

/* Host `h` back in its detector (counters zeroed first: an ejected host counts nothing). */
static __always_inline void dp_od_uneject(struct dp_od_host *h)
{
    h->c5xx = 0; /* Envoy zeroes the counters at unejection */
    h->cgw = 0;
    if (!__sync_lock_test_and_set(&h->ejected, 0))
        return;
    __u32 di = h->det;
    struct dp_od_det *d = dp_odd.lookup(&di);
    if (d)
        __sync_fetch_and_add(&d->ejected, (__u64)-1);
}

/* A detector op; returns `go` for the DELIVER ops after it. */
static __always_inline int dp_od_apply_det(struct dp_od_op *o, int go)
{
    __u32 di = o->det;
    struct dp_od_det *d = dp_odd.lookup(&di);
    if (!d)
        return 0;
    if (o->op == DP_OD_OP_DET) {
        d->allowed = o->a;
        d->total = o->b;
        d->panic = o->c;
        d->window_ns = o->ns;
        return go;
    }
    if (o->op == DP_OD_OP_DUE && (!d->pending || (__s64)(o->ns - d->due_ns) < 0))
        return 0; /* not due (a kernel ejection out of the window may have delivered it) */
    if (o->op == DP_OD_OP_DUE || dp_od_merge(d, o->ns)) {
        d->pending = 0; /* every host's state goes to the LB now (the DELIVER ops) */
        d->last_ns = o->ns;
        return 1;
    }
    return 0;
}

static __always_inline int dp_od_apply(struct dp_od_op *o, int go)
{
    __u32 slot = o->slot;
    if (o->op == DP_OD_OP_STATUS) {
        dp_outlier_status(slot + 1, o->a);
        return go;
    }
    if (o->op == DP_OD_OP_LOCAL) {
        dp_outlier_local(slot + 1, o->a);
        return go;
    }
    if (o->op >= DP_OD_OP_DET && o->op <= DP_OD_OP_DUE)
        return dp_od_apply_det(o, go);
    struct dp_od_host *h = dp_odh.lookup(&slot);
    if (!h)
        return go;
    if (o->op == DP_OD_OP_UNEJECT || o->op == DP_OD_OP_LEAVE)
        dp_od_uneject(h);
    __u32 di = h->det;
    struct dp_od_det *d = dp_odd.lookup(&di);
    if (o->op == DP_OD_OP_DELIVER && go && d) {
        dp_od_lb_set(d, h, h->ejected);
    } else if (o->op == DP_OD_OP_LEAVE) {
        if (d)
            dp_od_lb_set(d, h, 0);
        h->det = DP_OD_DETS; /* no detector: never ejected again until CFG */
    } else if (o->op == DP_OD_OP_CFG) {
        h->t5xx = o->a;
        h->tgw = o->b;
        h->tlo = o->c;
        h->det = o->det;
    }
    return go;
}

/* Run by the agent only, with BPF_PROG_TEST_RUN (never attached): the data is
 * an array of struct dp_od_op, applied in order; `go` carries a CHANGE's or
 * DUE's decision to the DELIVER ops after it in the same run. */
int dp_od_ops(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct dp_od_op *o = data;
    int go = 1;
    for (int i = 0; i < DP_OD_BATCH; i++) {
        if ((void *)(o + 1) > end)
            break;
        go = dp_od_apply(o, go);
        o++;
    }
    return XDP_DROP;
}

/* dp_srv_verdict and dp_skb_verdict, after dp_close_response_* copied the
 * head of the write into the per-CPU scratch (rb->up == up): the first write
 * of a response to a request the kernel (or the retry agent) forwarded to a
 * host with outlier detection (od_host is set with the wait bit, so this
 * write was a first one). One copy of the head per response for both. */
static __always_inline void dp_outlier_response(__u64 up, struct dp_peer_val *p)
{
    __u32 host1 = p->od_host;
    if (!host1)
        return;
    p->od_host = 0; /* counted once: set again at the next FORWARD (or retry) on U */
    __u32 zero = 0;
    struct dp_rbuf *rb = dp_rscratch.lookup(&zero);
    if (!rb || rb->up != up)
        return; /* head not copied: not counted */
    dp_outlier_status_line(host1, rb->b); /* b[11] is 0 unless the write had 12 bytes */
}
#else
/* Without -DDP_OUTLIER=1: empty stubs, so the call sites read straight (as
 * dp_rewrite.h's); the compiler removes them. */
static __always_inline __u32 dp_outlier_pick(__u32 gen, __u32 cid, __u32 *ep)
{
    return 0; /* no outlier detection: l7fp_decide's pick stands */
}

static __always_inline void dp_outlier_response(__u64 up, struct dp_peer_val *p)
{
}

static __always_inline void dp_outlier_sent(__u32 host1)
{
}
#endif

#endif
