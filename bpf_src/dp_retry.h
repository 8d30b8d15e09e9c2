/* Retries on the response status, in the data path (paired upstreams).
 *
 * Owner: the retry part of K2 (fastpath/retry.py, fastpath/agent_retry.py are
 * its user-space half). Pasted after the decision header and before sk_msg.c
 * (fastpath/loader.py). Compiled in only with -DDP_RETRY=1, which the agent
 * sets when a node's plan has a KERNEL route with a retry policy that can fire;
 * without it every function here is empty and the maps stay unused.
 *
 * How a retry happens (Envoy's semantics, RetryStateImpl::wouldRetryFromHeaders):
 *  1. sk_msg (FORWARD of a route with a policy in dp_rpol): the whole request
 *     (head + body, after the header inserts) must be in this write and fit
 *     DP_RETRY_MAX, else it goes to Envoy (DP_R_RETRY_COPY). It is copied into
 *     dp_retry[U] with state ARMED (U: the bound upstream's cookie).
 *  2. dp_srv_verdict (the app's writes on A, paired with U): the first write
 *     after ARMED starts the response. If retries are left, the status is one
 *     of the policy's codes or the head's grpc-status is one of its gRPC codes,
 *     no x-envoy-ratelimited header vetoes it, and the
 *     cluster has fewer than max_retries retries pending (circuit breaker),
 *     the response is diverted into U's own receive queue (state DIVERT: every
 *     write of A goes there until the agent clears it) and the agent is told
 *     (DP_EV_RETRY). Otherwise it goes to the client as usual.
 *  3. The agent reads and drops the whole diverted response, waits Envoy's
 *     jittered backoff and re-sends the copy (attempt count + 1) on the same or
 *     another endpoint's upstream, re-armed with one retry less. The last
 *     attempt's response is never diverted: the client gets it unchanged.
 * Unpaired upstreams (TCP + sk_skb) are marked in dp_tcp_up by the agent;
 * requests of retry routes bound to one go to Envoy (DP_R_RETRY_TCP).
 */
#ifndef L7FP_DP_RETRY_H
#define L7FP_DP_RETRY_H

#ifndef DP_RETRY
#define DP_RETRY 0
#endif
#ifndef DP_RETRY_MAX
#define DP_RETRY_MAX 4096 /* a request kept for a retry is shorter (power of 2) */
#endif
#ifndef DP_RESP_SCAN
#define DP_RESP_SCAN 512 /* bytes of a response head searched for grpc-status / vetoes */
#endif
#define DP_RETRY_CODES 8      /* retriable status codes per policy */
#define DP_RETRY_CLUSTERS 256 /* cluster ids with a retry breaker (power of 2) */

#define DP_RS_IDLE 0
#define DP_RS_ARMED 1  /* request sent: the next write of A starts its response */
#define DP_RS_DIVERT 2 /* A's writes go to U's receive queue (the agent reads them) */

#define DP_EV_RETRY 3         /* a response was diverted: the agent retries */
#define DP_OUT_RETRY 4        /* outcome counted when a response is diverted */
#define DP_R_RETRY_COPY 12    /* retry route: request not in one write or too big to keep */
#define DP_R_RETRY_TCP 13     /* retry route bound to an unpaired upstream */
#define DP_R_RETRY_OVERFLOW 14 /* (outcome fast) retry not made: max_retries reached */
#define DP_R_RETRY_LOST 15     /* (outcome fast) request not kept (pull/copy/map full) */

struct dp_rpol_key {
    __u32 gen;
    __u32 route; /* dp_verdict.route (route id + 1) */
};

/* A route's retry policy (written by the agent per plan generation). */
struct dp_rpol {
    __u32 num_retries;
    __u32 grpc_mask;   /* bit n: retry when grpc-status is n (0..31) */
    __u32 n_codes;
    __u32 max_retries; /* the cluster's circuit breaker */
    __u16 codes[DP_RETRY_CODES]; /* statuses; a value below 10 is a class (5: any 5xx) */
};

/* Per bound upstream U (key: U's cookie). */
struct dp_retry {
    __u32 state;   /* DP_RS_* */
    __u32 left;    /* retries left */
    __u32 route;
    __u32 gen;
    __u32 cluster; /* decision cluster id (breaker slot, the agent's endpoint choice) */
    __u32 len;     /* bytes in req */
    __u32 attempt; /* 1: the first try */
    __u32 status;  /* status of the diverted response */
    __u64 client;  /* client cookie */
    __u32 pool;    /* U's pool */
    __u32 _pad;
    struct dp_rpol pol;
    __u8 req[DP_RETRY_MAX];
};

BPF_HASH(dp_rpol, struct dp_rpol_key, struct dp_rpol, 1024);
BPF_F_TABLE("hash", __u64, struct dp_retry, dp_retry, DP_MAX_UP, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(dp_retry_tmp, struct dp_retry, DP_BINDS); /* keyed by dp_conn.body_bind */
BPF_ARRAY(dp_retry_busy, __u32, DP_RETRY_CLUSTERS); /* retries pending per cluster id */
BPF_HASH(dp_tcp_up, __u64, __u32, DP_MAX_UP);        /* unpaired upstreams (agent) */

/* The retry policy of the decided route, or 0 (no retries: nothing to do). */
static __always_inline struct dp_rpol *dp_retry_policy(__u32 gen, struct dp_verdict *v)
{
#if DP_RETRY
    struct dp_rpol_key k = {.gen = gen & 1, .route = v->route};
    return dp_rpol.lookup(&k);
#else
    return 0;
#endif
}

/* True when the upstream bound at c->binds[b] is unpaired (dp_tcp_up). The
 * key is read in place (sk_storage), not copied to the stack. */
static __always_inline int dp_retry_tcp(struct dp_conn *c, int b)
{
#if DP_RETRY
    return dp_tcp_up.lookup(&c->binds[b & (DP_BINDS - 1)].up_cookie) != 0;
#else
    return 0;
#endif
}

/* The per-CPU record being filled for this connection's request. Its key is
 * c->body_bind read in place (0..DP_BINDS-1, unchanged for a retry route's
 * request, whose body is never split): no key on the stack. dp_msg_verdict is
 * near the 512-byte stack limit (with an Istio plan's knobs the copy's locals
 * pushed it over, and that compile error ends the process). */
static __always_inline struct dp_retry *dp_retry_scratch(struct dp_conn *c)
{
    return dp_retry_tmp.lookup(&c->body_bind);
}

/* At the decision: 1 when the route retries; its policy and the request's
 * fields go into the per-CPU record now, while the stack is not at its peak. */
static __always_inline int dp_retry_prepare(struct dp_conn *c, __u32 gen, struct dp_verdict *v)
{
#if DP_RETRY
    struct dp_rpol *p = dp_retry_policy(gen, v);
    if (!p)
        return 0;
    struct dp_retry *t = dp_retry_scratch(c);
    if (!t)
        return 0;
    t->state = DP_RS_ARMED;
    t->left = p->num_retries;
    t->route = v->route;
    t->gen = gen & 1;
    t->cluster = v->cluster;
    t->attempt = 1;
    t->status = 0;
    t->client = c->cookie;
    t->pool = v->pool;
    t->pol = *p;
    return 1;
#else
    return 0;
#endif
}

/* Keep a copy of the request (its first `len` bytes, header inserts included)
 * in the prepared record, armed on the upstream bound at c->binds[b].
 * Returns 0, or -1. */
static __always_inline int dp_retry_arm(struct sk_msg_md *msg, struct dp_conn *c, int b,
                                        __u32 len)
{
#if DP_RETRY
    struct dp_retry *t = dp_retry_scratch(c);
    if (!t)
        return -1;
    if (len == 0 || len >= DP_RETRY_MAX)
        return -1;
    if (bpf_msg_pull_data(msg, 0, len, 0))
        return -1;
    void *d = msg->data;
    __u64 n = len;
    /* len < DP_RETRY_MAX already; the mask in asm, so clang cannot drop it, gives the
     * verifier that bound on the register it passes */
    asm volatile("%0 &= %1" : "+r"(n) : "i"(DP_RETRY_MAX - 1));
    if ((void *)(d + n) > msg->data_end)
        return -1;
    if (bpf_probe_read_kernel(t->req, n, d))
        return -1;
    t->len = len;
    return dp_retry.update(&c->binds[b & (DP_BINDS - 1)].up_cookie, t) ? -1 : 0;
#else
    return 0;
#endif
}

/* Response heads are searched in a per-CPU copy: indexes into a map value need
 * no packet bounds check per byte, which keeps the verifier's work per loop
 * iteration small (a packet loop with per-byte checks and name compares ran
 * into "sequence of 8193 jumps is too complex"). */
struct dp_head {
    __u8 b[2 * DP_RESP_SCAN];
};
BPF_PERCPU_ARRAY(dp_head_tmp, struct dp_head, 1);

#define DP_HMASK (2 * DP_RESP_SCAN - 1)
/* Header names as 8-byte windows of (byte | 0x20): ASCII letters fold to lower
 * case; '-', ':' and digits are unchanged; the leading '\n' (0x2a here) is
 * checked exactly on a hit. "\ngrpc-status:" and
 * "\nx-envoy-ratelimited:", last 8 bytes in w1, the 8 before in w2, then w3. */
#define DP_G1 0x2d7374617475733aULL
#define DP_G2 0x2a67727063ULL /* 5 bytes */
#define DP_R1 0x6c696d697465643aULL
#define DP_R2 0x766f792d72617465ULL
#define DP_R3 0x2a782d656eULL

/* Offset just after the first header line named by the windows (k1: last 8
 * bytes; k2, k3: the 8 and 8 before, under masks m2, m3) that starts the line (its
 * '\n' at i - back), or 0. Stops at the head's blank line. A hit leaves the
 * loop, and a miss is one branch on a value that is dead at the loop head, so
 * the verifier prunes the iterations (with the window compares as branches on
 * w1/w2 it ran out of its 1M instructions). */
static __always_inline __u32 dp_scan_head(struct dp_head *h, __u64 k1, __u64 k2,
                                          __u64 m2, __u64 k3, __u64 m3, __u32 back)
{
    __u64 w1 = 0, w2 = 0, w3 = 0;
    __u32 raw = 0;
#pragma clang loop unroll(disable)
    for (__u32 i = 0; i < DP_RESP_SCAN; i++) {
        __u8 c = h->b[i & DP_HMASK]; /* the copy ends with "\r\n\r\n" (dp_retry_wanted) */
        raw = (raw << 8) | c;
        if (raw == 0x0d0a0d0a)
            break; /* end of the head */
        w3 = (w3 << 8) | (w2 >> 56);
        w2 = (w2 << 8) | (w1 >> 56);
        w1 = (w1 << 8) | (__u64)(c | 0x20);
        __u64 miss = (w1 ^ k1) | ((w2 & m2) ^ k2) | ((w3 & m3) ^ k3);
        asm volatile("" : "+r"(miss)); /* one branch, on a value dead at the loop head */
        if (miss == 0 && i >= back && h->b[(i - back) & DP_HMASK] == '\n')
            return i + 1;
    }
    return 0;
}

/* grpc-status value at offset `at` (after the colon), or -1. */
static __always_inline int dp_grpc_status(struct dp_head *h, __u32 n, __u32 at)
{
    int v = -1;
#pragma unroll
    for (int j = 0; j < 6; j++) {
        if (at + j >= n)
            return v;
        __u8 ch = h->b[(at + j) & DP_HMASK];
        if (ch == ' ' && v < 0)
            continue;
        if (ch < '0' || ch > '9')
            return v;
        v = (v < 0 ? 0 : v * 10) + (ch - '0');
    }
    return v;
}

/* Envoy's wouldRetryFromHeaders for this policy on the response head in the
 * message. Sets *status. */
static __always_inline int dp_retry_wanted(struct sk_msg_md *msg, struct dp_rpol *p,
                                           __u32 *status)
{
    __u32 size = msg->size;
    bpf_msg_pull_data(msg, 0, size < DP_RESP_SCAN ? size : DP_RESP_SCAN, 0);
    __u32 k0 = 0;
    struct dp_head *h = dp_head_tmp.lookup(&k0);
    if (!h)
        return 0;
    void *d = msg->data;
    __u64 n = (__u64)(msg->data_end - d);
    if (n < 13)
        return 0; /* status line not in this write: delivered as is */
    if (n > DP_RESP_SCAN)
        n = DP_RESP_SCAN;
    asm volatile("%0 &= %1" : "+r"(n) : "i"(DP_HMASK)); /* bound for the verifier */
    if (bpf_probe_read_kernel(h->b, n, d))
        return 0;
    /* a blank line after the copy ends every scan there (no length check per byte) */
    h->b[n & DP_HMASK] = '\r';
    h->b[(n + 1) & DP_HMASK] = '\n';
    h->b[(n + 2) & DP_HMASK] = '\r';
    h->b[(n + 3) & DP_HMASK] = '\n';
    if (h->b[0] != 'H' || h->b[1] != 'T' || h->b[2] != 'T' || h->b[3] != 'P' || h->b[4] != '/')
        return 0;
    __u8 c9 = h->b[9], c10 = h->b[10], c11 = h->b[11];
    if (c9 < '0' || c9 > '9' || c10 < '0' || c10 > '9' || c11 < '0' || c11 > '9')
        return 0;
    __u32 s = (c9 - '0') * 100 + (c10 - '0') * 10 + (c11 - '0');
    *status = s;
    __u32 cls = s / 100; /* a policy code below 10 is a status class (5: retry_on 5xx) */
    int hit = 0;
#pragma unroll
    for (int i = 0; i < DP_RETRY_CODES; i++) {
        if (i < p->n_codes && (p->codes[i] == s || p->codes[i] == cls))
            hit = 1;
    }
    if (!hit && p->grpc_mask) {
        /* "\ngrpc-status:": 13 bytes, 5 of them in w2 */
        __u32 at = dp_scan_head(h, DP_G1, DP_G2, 0xffffffffffULL, 0, 0, 12);
        if (at) {
            int g = dp_grpc_status(h, (__u32)n, at);
            if (g >= 0 && g < 32 && (p->grpc_mask & (1u << g)))
                hit = 1;
        }
    }
    if (!hit)
        return 0;
    /* Envoy does not retry a response with x-envoy-overloaded either, but the
     * destination's inbound sidecar drops that header from the app's response
     * (seen in tests/kernel_retry: the client's Envoy retried), so in a mesh it
     * never vetoes; x-envoy-ratelimited does (the client's Envoy did not retry). */
    if (dp_scan_head(h, DP_R1, DP_R2, ~0ULL, DP_R3, 0xffffffffffULL, 20))
        return 0; /* x-envoy-ratelimited: neither */
    return 1;
}

/* The rest of A's writes of a diverted response: into U's receive queue. */
static __always_inline int dp_retry_divert(struct sk_msg_md *msg, struct dp_retry *r, __u64 up)
{
    if (dp_up.msg_redirect_hash(msg, &up, BPF_F_INGRESS) == SK_PASS)
        return SK_PASS;
    r->state = DP_RS_IDLE; /* U is gone: the client gets the response */
    return -1;
}

/* Called by dp_srv_verdict for each write of A (U's cookie `up`). Returns the
 * verdict when the write was diverted, -1 when it goes to the client. */
static __always_inline int dp_retry_response(struct sk_msg_md *msg, __u64 up)
{
#if DP_RETRY
    struct dp_retry *r = dp_retry.lookup(&up);
    if (!r || r->state == DP_RS_IDLE)
        return -1;
    if (r->state == DP_RS_DIVERT)
        return dp_retry_divert(msg, r, up);
    r->state = DP_RS_IDLE; /* this write starts the response of the armed request */
    if (!r->left)
        return -1;
    __u32 status = 0;
    if (!dp_retry_wanted(msg, &r->pol, &status))
        return -1;
    __u32 slot = r->cluster & (DP_RETRY_CLUSTERS - 1);
    __u32 *busy = dp_retry_busy.lookup(&slot);
    if (!busy)
        return -1;
    if (*busy >= r->pol.max_retries) {
        dp_count(r->route, DP_OUT_FAST, DP_R_RETRY_OVERFLOW);
        return -1;
    }
    __sync_fetch_and_add(busy, 1); /* the agent takes it back when it re-sends */
    r->state = DP_RS_DIVERT;
    r->status = status;
    int ret = dp_retry_divert(msg, r, up);
    if (ret < 0) {
        __sync_fetch_and_add(busy, -1);
        return -1;
    }
    dp_count(r->route, DP_OUT_RETRY, 0);
    struct dp_event *e = dp_events.ringbuf_reserve(sizeof(struct dp_event));
    if (e) {
        __builtin_memset(e, 0, sizeof(*e));
        e->kind = DP_EV_RETRY;
        e->route = r->route;
        e->cookie = r->client;
        e->ts_ns = bpf_ktime_get_ns();
        e->status = status;
        e->pool = r->pool;
        e->up_cookies[0] = up;
        dp_events.ringbuf_submit(e, 0);
    }
    return ret;
#else
    return -1;
#endif
}

#endif
