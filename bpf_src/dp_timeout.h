/* Route timeouts on the fast path: the kernel half (records and response framing).
 *
 * Owner: NAME=timeout (K2 data path). Pasted after datapath.h by fastpath/loader.py.
 * Envoy's route timeout runs from the end of the downstream request until the
 * upstream response is complete. The kernel keeps, per pooled upstream U with a
 * timed request in flight, a record in dp_tmo (deadline from bpf_ktime_get_ns,
 * client cookie and address); the agent (fastpath/timeouts.py) scans the records
 * and acts on expiry (504 into the client, or a reset when the response had
 * started). Who wins the race between a late response and the agent's 504 is
 * decided by one map delete: dp_tmo_armed[U] exists while no response byte was
 * passed to the client; the kernel deletes it on the first response byte, the
 * agent deletes it to claim an expired request. Whoever's delete succeeds owns
 * the client's receive queue for this request, so the client never sees both a
 * response and a 504.
 *
 * With retries (fastpath/deadline.py): a response diverted to the retry agent
 * leaves the record armed (one route deadline over all attempts and backoffs);
 * the agent claims it with that same delete and moves it to the upstream of the
 * retry. A retry policy's per_try_timeout is a second deadline per attempt,
 * until the attempt's response starts (Envoy ignores it after that).
 *
 * Response end: Content-Length framing (and HEAD, 204, 304: no body) is tracked
 * byte by byte. Other framings (chunked, close-delimited, 1xx, a head longer
 * than DP_RESP_HEAD or split over writes) stop the timer at the first response
 * byte: the deadline then bounds the time to the response's start only (a
 * response that starts in time and stalls later is not cut, as Envoy would),
 * and the kernel never answers 504 where Envoy would not.
 */
#ifndef L7FP_DP_TIMEOUT_H
#define L7FP_DP_TIMEOUT_H

#ifndef DP_RESP_HEAD
#define DP_RESP_HEAD 512 /* bytes of a response head looked at (power of two) */
#endif

#define DP_F_TMO 16u /* dp_conn.flags: a timed request went out on this connection */

/* dp_tmo.state */
#define DP_TMO_BODY 1    /* request body still coming: the timer has not started */
#define DP_TMO_WAIT 2    /* timer running, no response byte yet */
#define DP_TMO_STARTED 3 /* response started (Content-Length framed), not complete */

struct dp_rto_key {
    __u32 gen;   /* plan generation */
    __u32 route; /* route id as in dp_verdict.route */
};

/* A route's timers (agent-written, fastpath/loader.py set_route_timeouts). */
struct dp_rto_val {
    __u32 ms;     /* route timeout: one deadline over every attempt (0: none) */
    __u32 try_ms; /* retry policy's per_try_timeout, per attempt until its response starts */
};

struct dp_tmo {
    __u64 deadline_ns; /* bpf_ktime_get_ns() clock: the next expiry the agent acts on; 0: none
                        * (body still coming, or only a per-try timer that ended) */
    __u64 client;      /* client socket cookie (dp_cli key) */
    __u64 left;        /* STARTED: response bytes still to come */
    __u32 timeout_ms;
    __u32 route;
    __u32 state;       /* DP_TMO_* */
    __u32 head_req;    /* 1: HEAD request, the response has no body */
    __u32 cli_ip;      /* client socket's own address (network order) */
    __u32 dst_ip;      /* its destination (network order, pre-NAT) */
    __u32 cli_port;    /* host order */
    __u32 dst_port;    /* host order */
    __u64 global_ns;   /* the route's deadline over all attempts (0: no route timeout) */
    __u32 try_ms;      /* per-try timeout of each attempt (0: none) */
    __u32 _pad;
};

struct dp_rbuf {
    /* parser state in map memory, not registers: the verifier then sees unknown
     * values at every line end, so its states of one loop turn stay equal (in
     * registers, each line-end position made a new state: over 1M insns) */
    __u32 ls, cl_off, ncl, te, head_len, _pad;
    __u64 up;    /* the upstream whose response head was parsed last (dp_close.h) */
    __u64 total; /* its dp_resp_total, for the timer's dp_tmo_response_* in the same run */
    __u8 b[DP_RESP_HEAD + 16]; /* +16: 8-byte loads at a masked offset stay inside */
};

BPF_HASH(dp_rto, struct dp_rto_key, struct dp_rto_val, 4096); /* route timers (agent) */
BPF_HASH(dp_tmo, __u64, struct dp_tmo, DP_MAX_UP);      /* U cookie -> timed request */
BPF_HASH(dp_tmo_armed, __u64, __u32, DP_MAX_UP);        /* U cookie: no response byte yet */
BPF_PERCPU_ARRAY(dp_rscratch, struct dp_rbuf, 1);

/* The request is complete upstream: the route's deadline (over all attempts)
 * and the first attempt's per-try deadline start now (Envoy: onRequestComplete);
 * the agent acts on the earlier of the two. */
static __always_inline void dp_tmo_start(struct dp_tmo *t)
{
    __u64 now = bpf_ktime_get_ns();
    __u64 g = t->timeout_ms ? now + (__u64)t->timeout_ms * 1000000ull : 0;
    __u64 d = t->try_ms ? now + (__u64)t->try_ms * 1000000ull : g;
    t->global_ns = g;
    t->deadline_ns = g && g < d ? g : d;
    t->state = DP_TMO_WAIT;
}

/* At FORWARD of a request on upstream `up` (before the redirect, so that the
 * response cannot come before the record). A route without a timeout clears a
 * record a previous request on this upstream may have left. */
static __always_inline void dp_tmo_arm(struct dp_conn *c, __u64 up, __u32 gen, __u32 route,
                                       __u32 local_port, __u32 body_follows, __u32 is_head)
{
    struct dp_rto_key k = {.gen = gen & 1, .route = route};
    struct dp_rto_val *ms = dp_rto.lookup(&k);
    if (!ms || !(ms->ms | ms->try_ms)) {
        if (c->flags & DP_F_TMO) {
            dp_tmo.delete(&up);
            dp_tmo_armed.delete(&up);
        }
        return;
    }
    c->flags |= DP_F_TMO;
    struct dp_tmo t = {};
    t.client = c->cookie;
    t.timeout_ms = ms->ms;
    t.try_ms = ms->try_ms;
    t.route = route;
    t.head_req = is_head;
    t.cli_ip = c->src_ip;
    t.dst_ip = c->dst_ip;
    t.cli_port = local_port;
    t.dst_port = c->dst_port;
    if (body_follows)
        t.state = DP_TMO_BODY;
    else
        dp_tmo_start(&t);
    __u32 one = 1;
    dp_tmo_armed.update(&up, &one);
    dp_tmo.update(&up, &t);
}

/* The forward failed: no request in flight on `up`. */
static __always_inline void dp_tmo_disarm(__u64 up)
{
    dp_tmo.delete(&up);
    dp_tmo_armed.delete(&up);
}

/* The last body byte of the request went to `up`: the timer starts now. */
static __always_inline void dp_tmo_body_done(__u64 up)
{
    struct dp_tmo *t = dp_tmo.lookup(&up);
    if (!t || t->state != DP_TMO_BODY)
        return;
    dp_tmo_start(t);
}

/* dp_srv_verdict diverted the response on `up` to the retry agent: this
 * attempt is over (Envoy resets it), so its per-try timer no longer counts;
 * the route's deadline keeps running through the backoff. The record stays
 * armed: the agent claims it and moves it to the upstream of the retry
 * (fastpath/deadline.py), or the agent's timer answers 504 first. */
static __always_inline void dp_tmo_retrying(__u64 up)
{
    struct dp_tmo *t = dp_tmo.lookup(&up);
    if (t && t->state == DP_TMO_WAIT)
        t->deadline_ns = t->global_ns;
}

static __always_inline __u64 dp_rb_low8(struct dp_rbuf *rb, __u32 off)
{
    /* one 8-byte load (unaligned map-value loads are fine on x86) */
    __u64 v = *(__u64 *)&rb->b[off & (DP_RESP_HEAD - 1)];
    return v | 0x2020202020202020ull; /* lower-case letters; ':' '-' digits unchanged */
}

static __always_inline __u32 dp_rb(struct dp_rbuf *rb, __u32 off)
{
    return rb->b[off & (DP_RESP_HEAD - 1)];
}

/* "content-" "length:" and "transfer" "-encodin" as little-endian words */
#define DP_W_CONTENT_ 0x2d746e65746e6f63ull
#define DP_W_LENGTH_C 0x3a6874676e656cull  /* 7 bytes "length:", 8th byte masked off */
#define DP_W_TRANSFER 0x726566736e617274ull
#define DP_W_ENCODIN 0x6e69646f636e652dull

/* Bytes of the whole response whose head starts rb (n bytes valid), or 0 when
 * its end cannot be told from the head (see the top of this file). */
static __always_inline __u64 dp_resp_total(struct dp_rbuf *rb, __u32 n, __u32 head_req)
{
    if (n < 16 || dp_rb(rb, 0) != 'H' || dp_rb(rb, 8) != ' ')
        return 0;
    __u32 d0 = dp_rb(rb, 9) - '0', d1 = dp_rb(rb, 10) - '0', d2 = dp_rb(rb, 11) - '0';
    if (d0 > 9 || d1 > 9 || d2 > 9)
        return 0;
    __u32 status = d0 * 100 + d1 * 10 + d2;
    if (status < 200)
        return 0; /* 1xx: a final response follows */
    rb->ls = rb->head_len = rb->cl_off = rb->ncl = rb->te = 0;
    for (__u32 i = 0; i < DP_RESP_HEAD - 1; i++) {
        if (i + 1 >= n)
            return 0; /* head not complete in this write */
        if (dp_rb(rb, i) != '\r' || dp_rb(rb, i + 1) != '\n')
            continue;
        __u32 ls = *(volatile __u32 *)&rb->ls; /* re-read: no register copy (see dp_rbuf) */
        if (i == ls) {
            *(volatile __u32 *)&rb->head_len = i + 2;
            break;
        }
        __u64 w0 = dp_rb_low8(rb, ls), w1 = dp_rb_low8(rb, ls + 8);
        if (i - ls >= 15 && w0 == DP_W_CONTENT_ && (w1 & 0xffffffffffffffull) == DP_W_LENGTH_C) {
            *(volatile __u32 *)&rb->cl_off = ls + 15;
            *(volatile __u32 *)&rb->ncl += 1;
        }
        if (i - ls >= 18 && w0 == DP_W_TRANSFER && w1 == DP_W_ENCODIN)
            *(volatile __u32 *)&rb->te = 1;
        *(volatile __u32 *)&rb->ls = i + 2;
    }
    __u32 head_len = *(volatile __u32 *)&rb->head_len, ncl = *(volatile __u32 *)&rb->ncl;
    __u32 cl_off = *(volatile __u32 *)&rb->cl_off;
    if (!head_len || *(volatile __u32 *)&rb->te || ncl > 1)
        return 0;
    if (head_req || status == 204 || status == 304)
        return head_len;
    if (!ncl)
        return 0; /* close-delimited */
    __u64 cl = 0;
    __u32 digits = 0, end = 0;
    for (__u32 j = 0; j < 24; j++) {
        __u32 ch = dp_rb(rb, cl_off + j);
        if (!digits && (ch == ' ' || ch == '\t'))
            continue;
        if (ch - '0' > 9) {
            end = ch;
            break;
        }
        cl = cl * 10 + (ch - '0');
        digits++;
    }
    if (!digits || digits > 15 || (end != '\r' && end != ' ' && end != '\t'))
        return 0;
    return head_len + cl;
}

/* A response write of `size` bytes on `up`, after the first one. */
static __always_inline void dp_tmo_consume(struct dp_tmo *t, __u64 up, __u32 size)
{
    if (size >= t->left)
        dp_tmo.delete(&up); /* complete: the timer stops */
    else
        t->left -= size;
}

/* The first response write on `up`; `total`: the whole response's length
 * (dp_resp_total of its head, 0: not known). */
static __always_inline void dp_tmo_head(struct dp_tmo *t, __u64 up, __u64 total, __u32 size)
{
    if (!total || size >= total || !t->global_ns) {
        /* complete, framing not tracked, or only a per-try timer (Envoy ignores
         * it once the response started): the timer stops */
        dp_tmo.delete(&up);
        return;
    }
    t->deadline_ns = t->global_ns; /* the per-try timer ended with the response's start */
    t->state = DP_TMO_STARTED;
    t->left = total - size;
}

/* The length of the response on `up` whose head this program run parsed
 * (dp_close_response_*, before the retry decision; one parse per response for
 * both), 0 when not known. */
static __always_inline __u64 dp_resp_total_of(__u64 up)
{
    __u32 zero = 0;
    struct dp_rbuf *rb = dp_rscratch.lookup(&zero);
    return rb && rb->up == up ? rb->total : 0;
}

/* Called with a response write on `up` (before it is passed to the client).
 * Returns 1 when the agent has timed the request out: drop the bytes. */
static __always_inline int dp_tmo_begin(struct dp_tmo *t, __u64 up, __u32 size)
{
    if (t->state == DP_TMO_STARTED) {
        dp_tmo_consume(t, up, size);
        return 0;
    }
    return dp_tmo_armed.delete(&up) != 0; /* claim the client's queue, or lose it */
}

/* The start both response hooks share. Returns the record whose response head
 * this write begins (the caller parses it), or NULL with *drop: 1 when the agent
 * has timed the request out (drop the bytes), 0 when there is nothing to do. */
static __always_inline struct dp_tmo *dp_tmo_on_response(__u64 up, __u32 size, int *drop)
{
    *drop = 0;
    struct dp_tmo *t = dp_tmo.lookup(&up);
    if (!t)
        return 0;
    __u32 state = t->state;
    if (dp_tmo_begin(t, up, size)) {
        *drop = 1;
        return 0;
    }
    return state == DP_TMO_STARTED ? 0 : t;
}

/* `size` response bytes of U's request, paired (sk_msg: the app's write on A,
 * msg->size) or unpaired (sk_skb: bytes arriving on U, skb->len). 0: pass
 * them on, 1: drop them. */
static __always_inline int dp_tmo_response(__u64 up, __u32 size)
{
    int drop;
    struct dp_tmo *t = dp_tmo_on_response(up, size, &drop);
    if (t)
        dp_tmo_head(t, up, dp_resp_total_of(up), size);
    return drop;
}

#endif
