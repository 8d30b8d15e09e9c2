/* sk_msg verdict on client sockets (map dp_cli): the per-request fast path.
 *
 * Owner: K2. Attached by fastpath/loader.py to dp_cli. For every write of a
 * tracked client socket it asks dp_decide() what to do with the request at the
 * head of the write, then:
 *   FORWARD   redirect the request (head + Content-Length body) out of a pooled
 *             upstream socket bound to this connection (dp_up);
 *   REPLY     rewrite the request into the reply and redirect it into this
 *             socket's own receive queue (the upstream never sees it);
 *   NEED_MORE the head is split over writes: cork (DP_CORK) and decide again
 *             when the next write arrives, else hand the connection to Envoy;
 *   PASS      SK_PASS: the bytes go on to Envoy (slow path), and the
 *             connection stays with Envoy from then on (DP_F_ENVOY), so a
 *             response never overtakes another.
 * A write holding more than one request (pipelining) goes to Envoy as a
 * whole when its first request goes to an upstream: taking the others
 * different ways would let a kernel reply or an Envoy response overtake the
 * upstream's (measured: it does). When the kernel answers the first request,
 * the reply is in the client's receive queue before anything else can be, so
 * the rest of the write is decided as a new request (DP_F_REST). Once a
 * connection went to Envoy it stays there (sticky). A body longer than the
 * write follows its head to the same upstream (body_left), or is dropped when
 * the kernel answered its request (DP_F_SWALLOW).
 */

static __always_inline int dp_to_envoy(struct dp_conn *c, __u32 route, __u16 reason)
{
    c->flags |= DP_F_ENVOY;
    dp_count(route, DP_OUT_ENVOY, reason);
    return SK_PASS;
}

/* A whole request to Envoy at a request boundary: counted in dp_ret, so the
 * connection comes back to the kernel once Envoy has answered it
 * (dp_return.h); a request whose framing is not known makes C sticky. */
static __always_inline int dp_to_envoy_req(struct sk_msg_md *msg, struct dp_conn *c,
                                           struct dp_verdict *v, __u32 size, __u16 reason)
{
    if (!dp_ret_trackable(v, size) ||
        dp_ret_push(c, dp_ret_is_head(msg->data, msg->data_end)) != 0)
        return dp_to_envoy(c, v->route, reason);
    dp_count(v->route, DP_OUT_ENVOY, reason);
    return SK_PASS;
}

/* SK_PASS for the rest of a write whose first part was redirected: the kernel
 * keeps that redirect target in the message and would take SK_PASS as
 * "redirect again" (seen on 6.18). Redirecting to the socket's own egress is
 * what SK_PASS means. */
static __always_inline int dp_pass_rest(struct sk_msg_md *msg, struct dp_conn *c)
{
    __u64 self = c->cookie;
    c->flags &= ~DP_F_REDIR_REST;
    return dp_cli.msg_redirect_hash(msg, &self, 0);
}

/* msg->size, read as one ctx load: read in two places, clang shared the
 * address (ctx + 68) and the verifier refuses a load from a moved ctx pointer */
static __always_inline __u32 dp_msg_size(struct sk_msg_md *msg)
{
    __u32 n;
    asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(n) : "r"(msg),
                 "i"(__builtin_offsetof(struct sk_msg_md, size)));
    return n;
}

#define DP_LINE_SCAN 128 /* bytes of an incomplete head checked for the request line */
#define DP_TTP_1 0x5454502f312e000dULL /* "TTP/1.?\r": the request line's end, version masked */
#define DP_TTP_MASK 0xffffffffffff00ffULL

/* 1 when the bytes of an incomplete head can still be an HTTP/1 request: a
 * method of A-Z (1-16) then a space and, once the request line is complete,
 * " HTTP/1.x\r\n" at its end. Anything else goes to Envoy now, which answers
 * it (400) as it would have: corked, it would wait for bytes that never come
 * (seen: "PING\r\n" or a TLS hello hung the client). */
static __always_inline int dp_head_plausible(struct sk_msg_md *msg)
{
    __u8 *d = msg->data;
    void *end = msg->data_end;
    __u32 sp = 0;
    __u64 tail = 0;
    for (__u32 i = 0; i < DP_LINE_SCAN; i++) {
        if ((void *)(d + i + 1) > end)
            return 1;
        __u8 ch = d[i];
        if (!sp) {
            if (ch == ' ' && i > 0)
                sp = i;
            else if (ch < 'A' || ch > 'Z' || i >= 16)
                return 0;
            continue;
        }
        if (ch == '\n')
            return (tail & DP_TTP_MASK) == DP_TTP_1;
        tail = (tail << 8) | ch;
    }
    return 1;
}

/* A head split over writes: cork the write, so the kernel runs this program
 * again on these bytes plus the next write's (one message) and the request is
 * decided then; nothing leaves before. Not in a rest run (its message still
 * carries the first part's redirect): that goes to Envoy. */
static __always_inline int dp_need_more(struct sk_msg_md *msg, struct dp_conn *c,
                                        struct dp_verdict *v)
{
#if DP_CORK
    /* flag and size are read afresh, not tested on registers carried through
     * the decision: the verifier then tracked them precisely there and
     * explored the decision once per value range (552k instead of 371k insns) */
    __u32 size = dp_msg_size(msg);
    if (!(c->flags & DP_F_REST) && size < DP_HDR_MAX && dp_head_plausible(msg)) {
        bpf_msg_cork_bytes(msg, size + 1);
        dp_count(0, DP_OUT_CORK, 0);
        return SK_PASS;
    }
#endif
    return dp_to_envoy(c, v->route, DP_R_SPLIT);
}

/* The body of a request the kernel answered continues in this write: drop it
 * (the writer still sees its bytes sent; nobody receives them). Returns 1 when
 * the whole write was body, 0 when a request follows in what is left, -1 when
 * the pop failed. */
static __always_inline int dp_swallow(struct sk_msg_md *msg, struct dp_conn *c)
{
    __u32 size = dp_msg_size(msg);
    __u32 n = size < c->body_left ? size : c->body_left;
    if (bpf_msg_pop_data(msg, 0, n, 0))
        return -1;
    c->body_left -= n;
    if (!c->body_left)
        c->flags &= ~DP_F_SWALLOW;
    return size > n ? 0 : 1;
}

/* Start of the run for the rest of a write whose first request the kernel
 * answered: the message still carries that redirect (into our own ingress),
 * which the kernel would apply again to a plain SK_PASS. Point it at our own
 * egress first, which is what SK_PASS means; a forward or reply overrides it. */
static __always_inline void dp_rest_begin(struct sk_msg_md *msg, struct dp_conn *c)
{
    __u64 self = c->cookie;
    dp_cli.msg_redirect_hash(msg, &self, 0); /* DP_F_REST is cleared once decided */
}

static __always_inline void dp_access(struct dp_conn *c, struct dp_verdict *v, __u32 outcome,
                                      __u32 reason)
{
    if (!v->log)
        return;
    if (v->log > 1 && bpf_get_prandom_u32() % v->log)
        return; /* sampled: one request in v->log */
    struct dp_event *e = dp_events.ringbuf_reserve(sizeof(struct dp_event));
    if (!e)
        return;
    __builtin_memset(e, 0, sizeof(*e));
    e->kind = DP_EV_ACCESS;
    e->route = v->route;
    e->cookie = c->cookie;
    e->ts_ns = bpf_ktime_get_ns();
    e->outcome = outcome;
    e->reason = reason;
    e->status = v->status;
    e->bytes = v->consumed;
    e->pool = v->pool;
    e->dst_ip = c->dst_ip;
    e->dst_port = c->dst_port;
    dp_events.ringbuf_submit(e, 0);
}

/* The upstream socket of `pool` bound to this connection, binding a free one
 * from the pool on first use. Returns the bind index or -1. */
static __always_inline int dp_bind_upstream(struct dp_conn *c, __u32 pool)
{
    int free_slot = -1;
#pragma unroll
    for (int i = 0; i < DP_BINDS; i++) {
        if (c->binds[i].up_cookie && c->binds[i].pool == pool)
            return i;
        if (!c->binds[i].up_cookie && free_slot < 0)
            free_slot = i;
    }
    if (free_slot < 0)
        return -1;
    void *q = dp_free.lookup(&pool);
    if (!q)
        return -2;
    __u64 up = 0;
    if (bpf_map_pop_elem(q, &up) != 0 || !up)
        return -2;
    struct dp_peer_val pv = {.client = c->cookie};
    if (dp_peer.update(&up, &pv) != 0)
        return -2;
    /* free_slot is < DP_BINDS here; the mask keeps the verifier sure of it */
    int s = free_slot & (DP_BINDS - 1);
    c->binds[s].up_cookie = up;
    c->binds[s].pool = pool;
    return s;
}

/* To the app: into its accepted socket's receive queue when paired (no TCP on
 * either side), else out of U over TCP. A U is paired before the agent offers
 * it, so one U always takes the same way. */
static __always_inline int dp_forward(struct sk_msg_md *msg, struct dp_conn *c, int b)
{
    __u64 up = c->binds[b & (DP_BINDS - 1)].up_cookie;
    int ret = dp_srv.msg_redirect_hash(msg, &up, BPF_F_INGRESS);
    if (ret == SK_PASS)
        return ret;
    return dp_up.msg_redirect_hash(msg, &up, 0);
}

/* Copy `len` (<= DP_REPLY_MAX) bytes from `src` to the start of the message's
 * pulled data (the caller pulled at least `len` bytes). Returns len, or -1. */
static __always_inline int dp_copy_to_msg(struct sk_msg_md *msg, const __u8 *src, __u32 len)
{
    char *d = msg->data;
    void *end = msg->data_end;
    for (__u32 i = 0; i < DP_REPLY_MAX; i++) {
        __u32 j = i;
        /* hide j's relation to len from clang, so the verifier sees j < DP_REPLY_MAX */
        asm volatile("" : "+r"(j));
        if (j >= len || j >= DP_REPLY_MAX)
            break;
        if ((void *)(d + j + 1) > end)
            return -1;
        d[j] = src[j];
    }
    return (int)len;
}

/* Turn the first `consumed` bytes of the write into the reply `reply_id`
 * (bytes from dp_reply_get() of the decision header). */
static __always_inline int dp_rewrite_reply(struct sk_msg_md *msg, struct dp_verdict *v, __u32 gen)
{
    __u32 len = 0;
    __u8 *data = dp_reply_get(gen, v->reply_id, &len);
    if (!data)
        return -1;
    if (len == 0 || len > DP_REPLY_MAX)
        return -1;
    __u32 have = v->consumed;
    if (len > have) {
        if (bpf_msg_push_data(msg, have, len - have, 0))
            return -1;
    } else if (len < have) {
        if (bpf_msg_pop_data(msg, len, have - len, 0))
            return -1;
    }
    if (bpf_msg_pull_data(msg, 0, len, 0))
        return -1;
    return dp_copy_to_msg(msg, data, len);
}

/* Kernel reply to the request at the head of the write: rewrite its bytes in
 * this write into the reply and redirect that into this socket's own receive
 * queue. A body continuing in later writes is dropped there (DP_F_SWALLOW); a
 * request following in this write is decided on the next run (DP_F_REST),
 * after the reply is queued. */
static __always_inline int dp_reply(struct sk_msg_md *msg, struct dp_conn *c, struct dp_verdict *v,
                                    __u32 gen, __u32 size)
{
    /* What follows is settled in the connection (memory) before the rewrite,
     * and the length to rewrite is read back from there: a value the verifier
     * knew per branch made it walk the rewrite's copy loop once per branch
     * (703k instead of ~370k insns for a small plan). body_left is 0 here. */
    if (v->consumed > size) {
        c->body_left = v->consumed - size;
        c->flags |= DP_F_SWALLOW;
    } else if (v->consumed < size) {
        c->flags |= DP_F_REST;
    }
    v->consumed -= c->body_left; /* the request's bytes in this write: what is rewritten */
    int n = dp_rewrite_reply(msg, v, gen);
    v->consumed += c->body_left; /* the access log counts the whole request */
    if (n < 0) {
        c->body_left = 0;
        c->flags &= ~(DP_F_SWALLOW | DP_F_REST);
        return dp_to_envoy(c, v->route, DP_R_REWRITE);
    }
    if (c->flags & DP_F_REST)
        bpf_msg_apply_bytes(msg, n);
    dp_count(v->route, DP_OUT_REPLY, 0);
    dp_access(c, v, DP_OUT_REPLY, 0);
    __u64 self = c->cookie;
    return dp_cli.msg_redirect_hash(msg, &self, BPF_F_INGRESS);
}

/* Insert header blob `idx` (dp_hdr_add_get) at offset `at` of the message.
 * Returns the bytes inserted, or -1 (nothing inserted, or the message is no
 * longer usable: the caller sends it to Envoy, which rejects a damaged head
 * rather than misroute it). */
static __always_inline int dp_insert_blob(struct sk_msg_md *msg, __u32 gen, __u32 idx, __u32 at)
{
    __u32 len = 0;
    __u8 *src = dp_hdr_add_get(gen, idx, &len);
    if (!src || len == 0 || len > DP_REPLY_MAX)
        return -1;
    if (bpf_msg_push_data(msg, at, len, 0))
        return -1;
    if (bpf_msg_pull_data(msg, at, at + len, 0))
        return -1;
    return dp_copy_to_msg(msg, src, len);
}

/* Insert the route's request headers at head_len - 2 (before the blank line,
 * or before the x-envoy-original-path line a path rewrite put there: `skip`
 * bytes of it), then the destination's inbound ones after them and after that
 * line (the order the two sidecars add them in). Returns the bytes inserted,
 * or -1. */
static __always_inline int dp_insert_headers(struct sk_msg_md *msg, struct dp_verdict *v,
                                             __u32 gen, __u32 skip)
{
    if (v->head_len < 4)
        return -1;
    int n = 0;
    if (v->hdr_add) {
        n = dp_insert_blob(msg, gen, v->hdr_add, v->head_len - 2);
        if (n < 0)
            return -1;
    }
    if (v->hdr_add_in) {
        int m = dp_insert_blob(msg, gen, v->hdr_add_in,
                               v->head_len - 2 + (n & 0xffff) + (skip & 0xffff));
        if (m < 0)
            return -1;
        n += m;
    }
    return n;
}

/* 1 when the request at the head of the write is a HEAD (its response has no body). */
static __always_inline __u32 dp_is_head(struct sk_msg_md *msg)
{
    char *d = msg->data;
    if ((void *)(d + 5) > msg->data_end)
        return 0;
    return d[0] == 'H' && d[1] == 'E' && d[2] == 'A' && d[3] == 'D' && d[4] == ' ';
}

/* dp_msg_verdict -> dp_msg_act: the verdict and what it needs of the first
 * half (per CPU: an sk_msg program and its tail call run on one CPU). */
struct dp_msg_scratch {
    struct dp_verdict v;
    __u32 gen;
    __u32 tmo;
    __u32 size;
    __u32 bind;    /* dp_msg_act -> dp_msg_rw: the bound upstream (index in c->binds) */
    __u32 rpol;    /* ... a retry copy is due */
    __u32 is_head; /* ... the request is a HEAD */
    __u32 rw;      /* dp_rewrite.h DP_RW_*: the route's rewrite (0: not looked up yet) */
    __u32 in_lid;  /* dp_msg_rwin -> dp_msg_in: the inbound listener id + 1 (0: none) */
    __u32 saved[2]; /* dp_msg_rwin -> dp_msg_in: the parsed path (dp_rw_build; [1] 0: none) */
};
BPF_PERCPU_ARRAY(dp_msg_scr, struct dp_msg_scratch, 1);
BPF_PROG_ARRAY(dp_msg_prog, 4); /* 0: dp_msg_act, 1: dp_msg_in, 2: dp_msg_rw, 3: dp_msg_rwin */
#if DP_RW_ON && defined(DP_DECIDE_SECOND)
#define DP_PROG_IN 3 /* a FORWARD goes through dp_msg_rwin to dp_msg_in */
#else
#define DP_PROG_IN 1
#endif

int dp_msg_verdict(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_PASS;
    struct dp_conn *c = dp_conn_st.sk_storage_get(sk, 0, 0);
    if (!c) {
        dp_count(0, DP_OUT_ENVOY, DP_R_NO_STATE);
        return SK_PASS;
    }
    if (c->flags & DP_F_ENVOY) {
        dp_count(0, DP_OUT_ENVOY, DP_R_STICKY);
        if (c->flags & DP_F_REDIR_REST)
            return dp_pass_rest(msg, c);
        return SK_PASS;
    }
    if (c->flags & DP_F_REST)
        dp_rest_begin(msg, c);
    if (c->body_left && (c->flags & DP_F_SWALLOW)) {
        int sw = dp_swallow(msg, c);
        if (sw < 0) {
            dp_count(0, DP_OUT_ENVOY, DP_R_SWALLOW);
            return SK_DROP; /* the write fails: better than a body read as a request */
        }
        if (sw > 0)
            return SK_PASS; /* nothing left: nothing is sent */
    }
    __u32 size = msg->size;
    if (c->body_left) {
        /* the rest of a body whose head already went to an upstream */
        int b = c->body_bind & (DP_BINDS - 1);
        if (!c->binds[b].up_cookie)
            return dp_to_envoy(c, 0, DP_R_BODY); /* cannot happen: unbound mid-body */
        if (size > c->body_left) {
            /* a request follows the body in this write: it goes to Envoy */
            bpf_msg_apply_bytes(msg, c->body_left);
            c->body_left = 0;
            c->flags |= DP_F_ENVOY | DP_F_REDIR_REST;
            dp_count(0, DP_OUT_ENVOY, DP_R_PIPELINE);
        } else {
            c->body_left -= size;
        }
        if (!c->body_left && (c->flags & DP_F_TMO))
            dp_tmo_body_done(c->binds[b].up_cookie); /* end of request: the timer starts */
        return dp_forward(msg, c, b);
    }
    __u32 k0 = 0;
    struct dp_gen_cfg *cfg = dp_cfg.lookup(&k0);
    if (!cfg || !cfg->enabled)
        return dp_to_envoy(c, 0, DP_R_NO_PLAN);
    __u32 gen = cfg->gen;
    __u32 tmo = cfg->timeouts;
    c->gen = gen;
    struct dp_svc_key sk_dst = {.ip = c->dst_ip, .port = c->dst_port};
    struct dp_svc_val *svc = dp_svc.lookup(&sk_dst);
    c->listener = svc ? svc->lid[gen & 1] : 0;
    if (!c->listener)
        return dp_to_envoy(c, 0, DP_R_NO_PLAN);
    bpf_msg_pull_data(msg, 0, size < DP_HDR_MAX ? size : DP_HDR_MAX, 0);
    __u32 k1 = 0;
    struct dp_msg_scratch *scr = dp_msg_scr.lookup(&k1);
    if (!scr)
        return dp_to_envoy(c, 0, DP_R_NONE); /* cannot happen: an array entry */
    struct dp_verdict *v = &scr->v; /* not on the stack: the decision needs it */
    __builtin_memset(v, 0, sizeof(*v));
    v->log = cfg->access_log;
    dp_decide(c, gen, msg->data, msg->data_end, v);
    if (v->kind == DP_K_NEED_MORE)
        return dp_need_more(msg, c, v); /* decided (and counted) once complete */
    scr->gen = gen;
    scr->tmo = tmo;
    scr->size = size;
    scr->rw = 0;
    scr->in_lid = 0;
    scr->saved[1] = 0;
#ifdef DP_DECIDE_SECOND
    if (v->kind == DP_K_FORWARD) {
        dp_msg_prog.call(msg, DP_PROG_IN); /* the destination's inbound decision */
        return dp_to_envoy(c, v->route, DP_R_NONE); /* not loaded: never skip it (rule 4) */
    }
#endif
    dp_msg_prog.call(msg, 0); /* dp_msg_act: acts on the verdict */
    return dp_to_envoy(c, v->route, DP_R_NONE); /* no program in dp_msg_prog */
}

/* What the tail-called programs (dp_msg_in, dp_msg_act) continue from: the
 * client connection's state (*c) and dp_msg_verdict's per-CPU verdict. NULL
 * when either is missing (then the write passes on to Envoy untouched). */
static __always_inline struct dp_msg_scratch *dp_msg_tail_state(struct sk_msg_md *msg,
                                                                 struct dp_conn **c)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return 0;
    struct dp_conn *conn = dp_conn_st.sk_storage_get(sk, 0, 0);
    if (!conn)
        return 0;
    *c = conn;
    __u32 k1 = 0;
    return dp_msg_scr.lookup(&k1);
}

/* The destination's inbound decision on a FORWARD verdict of dp_msg_verdict
 * (DP_INBOUND), a program of its own for the verifier's sake
 * (dp_decide_l7fp.h dp_decide_second), then dp_msg_act. Without an inbound
 * decision compiled in it is never called. The loader puts it into
 * dp_msg_prog[1]. With path rewrites compiled in, dp_msg_rwin runs first and
 * found the listener (scr->rw set); for a rewrite route it put the new path
 * into the parse context, which goes back once decided. */
int dp_msg_in(struct sk_msg_md *msg)
{
    struct dp_conn *c;
    struct dp_msg_scratch *scr = dp_msg_tail_state(msg, &c);
    if (!scr)
        return SK_PASS;
#ifdef DP_DECIDE_SECOND
    __u32 lid = DP_RW_ON && scr->rw ? scr->in_lid : dp_inbound_lid(scr->gen);
    dp_decide_second(scr->gen, lid, &scr->v);
    dp_rw_unbuild(scr->saved); /* dp_rewrite reads the path as parsed */
    dp_mirror_inbound(scr->gen, &scr->v); /* Envoy shadows what the inbound side answers */
    dp_delay_inbound(scr->gen, &scr->v); /* and delays it first (a delay route) */
#endif
    dp_msg_prog.call(msg, 0); /* dp_msg_act */
    return dp_to_envoy(c, scr->v.route, DP_R_NONE);
}

#if DP_RW_ON && defined(DP_DECIDE_SECOND)
/* Between dp_msg_verdict and dp_msg_in for a FORWARD when the plan has path
 * rewrites and inbound decisions (dp_msg_prog[3], loaded with -DDP_REWRITE=1
 * and -DDP_INBOUND=1): the request's one dp_rw lookup (scr->rw, which
 * dp_msg_act then reuses) and dp_ep_in lookup (scr->in_lid); for a rewrite
 * route with an inbound decision, the rewritten path for that decision
 * (dp_rewrite.h dp_rw_build), or Envoy when the kernel cannot decide it. A
 * program of its own: dp_msg_in's budget is the decision's. */
int dp_msg_rwin(struct sk_msg_md *msg)
{
    struct dp_conn *c;
    struct dp_msg_scratch *scr = dp_msg_tail_state(msg, &c);
    if (!scr)
        return SK_PASS;
    struct dp_rw *rw = dp_rw_get(scr->gen, scr->v.route); /* the request's one lookup */
    scr->rw = dp_rw_state(rw);
    scr->in_lid = dp_inbound_lid(scr->gen);
    /* DP_RW_REFUSED too (rw set): its inbound decision may answer (a 403 on the
     * new path) before dp_msg_act hands a forward to Envoy; decided on the
     * parsed path it answered /old/h (client-sent x-envoy-original-path) 403
     * under a DENY of /old/*, where Envoy forwards /new/h (test_rewrite_mesh.py) */
    if (rw && scr->in_lid && dp_rw_build(rw, scr->saved)) {
        dp_rw_unbuild(scr->saved);
        scr->v.kind = DP_K_PASS;
        scr->v.reason = DP_R_RW;
        dp_msg_prog.call(msg, 0); /* dp_msg_act: to Envoy, counted */
        return dp_to_envoy(c, scr->v.route, DP_R_NONE);
    }
    dp_msg_prog.call(msg, 1); /* dp_msg_in */
    dp_rw_unbuild(scr->saved); /* no dp_msg_in loaded: the swapped path goes back here too */
    return dp_to_envoy(c, scr->v.route, DP_R_NONE);
}
#endif

/* The rest of dp_msg_act once the upstream is bound (b) and nothing before
 * can hand the request to Envoy: header inserts, timer, send, retry copy,
 * shadow. Called by dp_msg_act, and by dp_msg_rw after a path rewrite (a
 * program of its own: see there). `is_head`: the request is a HEAD (read
 * before the message changed). `rw_line`: bytes of the x-envoy-original-path
 * line dp_msg_rw inserted at the head's end (0 from dp_msg_act). */
static __always_inline int dp_act_send(struct sk_msg_md *msg, struct dp_conn *c,
                                       struct dp_verdict v, __u32 gen, __u32 tmo,
                                       __u32 size, int b, int rpol, __u32 is_head,
                                       __u32 rw_line)
{
    if (v.hdr_add || v.hdr_add_in) {
        int n = dp_insert_headers(msg, &v, gen, rw_line);
        if (n < 0)
            return dp_to_envoy(c, v.route, DP_R_REWRITE);
        size += n;
        v.consumed += n;
    }
    if (size < v.consumed) {
        c->body_left = v.consumed - size;
        c->body_bind = b;
    }
    __u64 up = c->binds[b & (DP_BINDS - 1)].up_cookie;
    if (tmo || (c->flags & DP_F_TMO)) /* a route timeout in this plan, or a stale record */
        dp_tmo_arm(c, up, gen, v.route, msg->local_port, c->body_left != 0, is_head);
    __u32 dms = dp_delay_sample(gen, &v); /* the draw, once nothing can pass */
    int ret = dms ? dp_delay_hold(msg, c, up, dms, v.consumed, v.route) : dp_forward(msg, c, b);
    if (ret != SK_PASS) {
        /* upstream gone (closed by its server or the agent): drop the bind, tell
         * the agent to close its socket, go to Envoy */
        if (c->flags & DP_F_TMO)
            dp_tmo_disarm(up);
        dp_lr_end(up); /* the last request on U, if its end went unseen */
        dp_peer.delete(&up);
        c->binds[b & (DP_BINDS - 1)].up_cookie = 0;
        c->body_left = 0;
        struct dp_event *e = dp_events.ringbuf_reserve(sizeof(struct dp_event));
        if (e) {
            __builtin_memset(e, 0, sizeof(*e));
            e->kind = DP_EV_CLOSE;
            e->cookie = c->cookie;
            e->up_cookies[0] = up;
            dp_events.ringbuf_submit(e, 0);
        }
        return dp_to_envoy(c, v.route, DP_R_REDIRECT);
    }
    /* no response byte yet: a close of U's app now is a reset; whose response counts */
    dp_reset_wait(up, is_head, v.od_host);
    dp_lr_sent(up); /* in flight on its endpoint until its end (LEAST_REQUEST) */
    dp_outlier_sent(v.od_host); /* split local-origin count: this attempt is connected */
    dp_count(v.route, DP_OUT_FAST, dms ? DP_R_DELAYED : 0);
    dp_access(c, &v, DP_OUT_FAST, 0);
    /* Last, when little else is live: earlier (or inlined) the copy's locals
     * and spills pushed this function over the 512-byte stack with an Istio
     * plan's knobs. The redirect takes effect after we return, so the record
     * is armed before the app can answer. Failing here, the request is
     * already on its way: counted (fast/retry_lost), not retried. */
    if (rpol && dp_retry_arm(msg, c, b, v.consumed) < 0)
        dp_count(v.route, DP_OUT_FAST, DP_R_RETRY_LOST);
    dp_mirror_post(msg, &v, gen, v.consumed); /* the shadow copy, fire-and-forget */
    return SK_PASS;
}

/* The second half of dp_msg_verdict, reached by its tail call with the
 * verdict in dp_msg_scr: bind, header inserts, retry copy, timeout record,
 * redirect. A program of its own so that the verifier walks the decision and
 * the action separately (together: over its 1M-instruction budget with Istio's
 * retry policy and header inserts) and each has its own 512-byte stack (one
 * frame overflowed it with bookinfo-length strings). The loader puts it into
 * dp_msg_prog[0]. */
int dp_msg_act(struct sk_msg_md *msg)
{
    struct dp_conn *c;
    struct dp_msg_scratch *scr = dp_msg_tail_state(msg, &c);
    if (!scr)
        return SK_PASS;
#ifdef DP_HOP
    if (dp_hop_act(msg, c, &scr->v, &scr->size) < 0) /* Connection: keep-alive & co. */
        return dp_to_envoy(c, scr->v.route, DP_R_REWRITE);
    asm volatile("" ::: "memory"); /* what follows reads the scratch afresh */
#endif
#ifdef DP_XRID_H
    if (dp_xrid_act(msg, c, &scr->v, &scr->size) < 0) /* x-forwarded-proto, x-request-id */
        return dp_to_envoy(c, scr->v.route, DP_R_REWRITE);
    asm volatile("" ::: "memory");
#endif
    struct dp_verdict v = scr->v;
    __u32 gen = scr->gen;
    __u32 tmo = scr->tmo;
    __u32 size = scr->size;
    c->flags &= ~DP_F_REST;
    c->reqs++;
    int busy = dp_ret_busy(c); /* Envoy still owes responses: keep the order */
    if (busy == 2)
        return dp_to_envoy(c, v.route, DP_R_RSP_LOST);
    if (busy)
        return dp_to_envoy_req(msg, c, &v, size, DP_R_ENVOY_PENDING);
    if (v.kind == DP_K_PASS) {
        dp_access(c, &v, DP_OUT_ENVOY, v.reason);
        return dp_to_envoy_req(msg, c, &v, size, v.reason);
    }
    if (v.kind == DP_K_REPLY) {
        int held = dp_delay_reply(msg, c, &v, gen, size); /* an abort after a delay */
        if (held > 0) {
            dp_count(v.route, DP_OUT_REPLY, DP_R_DELAYED);
            return SK_PASS; /* the request was popped: nothing is sent */
        }
        if (held < 0)
            return dp_to_envoy_req(msg, c, &v, size, DP_R_DELAY_BODY);
        int rd = dp_redirect(msg, c, &v, gen, size); /* Location built by the agent */
        if (rd > 0) {
            dp_count(v.route, DP_OUT_REPLY, DP_R_REDIRECTED);
            return SK_PASS; /* the request was popped: the agent answers */
        }
        if (rd < 0)
            return dp_to_envoy_req(msg, c, &v, size, DP_R_REDIR_HEAD);
        return dp_close_after(msg, c, dp_reply(msg, c, &v, gen, size)); /* Connection: close */
    }
    if (size > v.consumed)
        return dp_to_envoy(c, v.route, DP_R_PIPELINE); /* pipelined: one way for all */
    if (v.kind != DP_K_FORWARD)
        return dp_to_envoy(c, v.route, DP_R_NONE);
#if DP_RW_ON
    if (!scr->rw) /* dp_msg_rwin did not look: the route's rewrite, once */
        scr->rw = dp_rw_state_of(gen, v.route);
    if (scr->rw == DP_RW_REFUSED) /* dp_rewrite.h: x-envoy-original-path sent, long target */
        return dp_to_envoy_req(msg, c, &v, size, DP_R_RW);
#endif
    /* a flag, not the policy pointer: this function is near the 512-byte stack
     * limit (an Istio plan's knobs + DP_RETRY went over it with the pointer and
     * the upstream cookie kept across the header insert) */
    int rpol = dp_retry_prepare(c, gen, &v);
    /* a retry needs the whole request (+ header inserts) in this write, kept */
    if (rpol && (size != v.consumed || v.consumed + DP_REPLY_MAX + DP_RW_GROW >= DP_RETRY_MAX))
        return dp_to_envoy_req(msg, c, &v, size, DP_R_RETRY_COPY);
    /* a mirror copies the whole request too; else Envoy mirrors it (dp_mirror.h) */
    if (dp_mirror_route(gen, v.route) &&
        (size != v.consumed || v.consumed + DP_REPLY_MAX >= DP_MIRROR_MAX))
        return dp_to_envoy_req(msg, c, &v, size, DP_R_MIRROR_COPY);
    /* a fault delay holds the whole request: checked before its draw (dp_delay.h);
     * the lookup's result is not kept until the draw (a flag live from here on
     * doubled the verifier's walk of this program: 265k -> 510k processed) */
    if (size != v.consumed && dp_delay_route(gen, &v))
        return dp_to_envoy_req(msg, c, &v, size, DP_R_DELAY_BODY);
    int b = dp_bind_upstream(c, v.pool);
    if (b < 0) {
        __u16 why = b == -1 ? DP_R_BINDS : DP_R_POOL_EMPTY;
        dp_access(c, &v, DP_OUT_ENVOY, why);
        __u32 pool = v.pool;
        __u64 *miss = dp_pool_miss.lookup(&pool);
        if (miss)
            __sync_fetch_and_add(miss, 1); /* the agent grows this pool */
        return dp_to_envoy_req(msg, c, &v, size, why);
    }
    if (rpol && dp_retry_tcp(c, b)) /* retries need a paired upstream */
        return dp_to_envoy_req(msg, c, &v, size, DP_R_RETRY_TCP);
    __u32 is_head = dp_is_head(msg);
#if DP_RW_ON
    if (*(volatile __u32 *)&scr->rw == DP_RW_YES) { /* read afresh: no flag kept live */
        /* a path rewrite (dp_rewrite.h) runs in dp_msg_rw, a program of its
         * own: here its copy loops were walked once per state reaching them
         * (over the 1M budget with a retry policy and header inserts) */
        scr->v = v;
        scr->size = size;
        scr->bind = b;
        scr->rpol = rpol;
        scr->is_head = is_head;
        dp_msg_prog.call(msg, 2); /* dp_msg_rw */
        return dp_to_envoy(c, v.route, DP_R_REWRITE); /* no dp_msg_rw loaded */
    }
#endif
    return dp_act_send(msg, c, v, gen, tmo, size, b, rpol, is_head, 0);
}

#if DP_RW_ON
/* dp_msg_act's tail call for a FORWARD on a route with a path rewrite
 * (dp_rewrite.h), after the bind: the rewrite, then dp_act_send. The loader
 * puts it into dp_msg_prog[2] when the module has it (-DDP_REWRITE=1). */
int dp_msg_rw(struct sk_msg_md *msg)
{
    struct dp_conn *c;
    struct dp_msg_scratch *scr = dp_msg_tail_state(msg, &c);
    if (!scr)
        return SK_PASS;
    struct dp_verdict v = scr->v;
    __u32 gen = scr->gen;
    __u32 tmo = scr->tmo;
    __u32 size = scr->size;
    int b = scr->bind & (DP_BINDS - 1);
    int rpol = scr->rpol;
    __u32 is_head = scr->is_head;
    __u32 line = 0; /* the x-envoy-original-path line: the inbound inserts go after it */
    int rwn = dp_rewrite(msg, &v, gen, &line); /* before the inserts: their place follows the path */
    if (rwn == DP_RW_FAILED)
        return dp_to_envoy(c, v.route, DP_R_REWRITE);
    v.consumed += rwn;
    return dp_act_send(msg, c, v, gen, tmo, size + rwn, b, rpol, is_head, line);
}
#endif

/* sk_msg on the app's accepted end A of a paired upstream (map dp_srv): the
 * app's response goes straight into the bound client's receive queue. With no
 * client bound (or gone) it takes TCP to U, whose sk_skb drops it. */
int dp_srv_verdict(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_PASS;
    struct dp_conn *a = dp_conn_st.sk_storage_get(sk, 0, 0);
    if (!a || !(a->flags & DP_F_SRV))
        return SK_PASS;
    __u64 up = a->cookie;
    struct dp_peer_val *client = dp_peer.lookup(&up);
    if (!client)
        return SK_PASS;
    __u64 ck = client->client;
    __u32 first = client->wait; /* this write starts a response (dp_close.h) */
    dp_reset_answered(client); /* a response byte (to the client or a retry) */
    dp_close_response_msg(msg, up, client, first); /* how much of the response is left */
    dp_lr_response(up, client); /* whole, or its end unseen: no longer in flight */
    dp_outlier_response(up, client); /* its status, from the head dp_close copied */
    /* the retry decision first: a diverted response starts nothing for the
     * client, and the route's deadline (one over all attempts) keeps running */
    int diverted = dp_retry_response(msg, up); /* a response to retry goes to the agent */
    if (diverted >= 0) {
        dp_tmo_retrying(up);
        return diverted;
    }
    if (dp_tmo_response(up, msg->size))
        return SK_PASS; /* timed out (the agent answered 504): over TCP to U, which drops it */
    /* a failed redirect leaves the message alone: SK_PASS then means TCP */
    dp_cli.msg_redirect_hash(msg, &ck, BPF_F_INGRESS);
    return SK_PASS;
}
