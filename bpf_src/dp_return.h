/* Connections handed to Envoy at a request boundary come back to the kernel.
 *
 * Owner: envoyreturn (K2 data path). Pasted by fastpath/loader.py after the
 * decision header and before sockops.c / sk_msg.c, which call the dp_ret_*
 * helpers; dp_rsp_verdict is attached by the loader to dp_cli as its
 * SK_SKB_VERDICT (no stream parser).
 *
 * When sk_msg hands a whole request (one complete request in the write, its
 * Content-Length body included, no Transfer-Encoding / Upgrade / Expect /
 * HTTP/1.0: the decisions give consumed > 0 only then) to Envoy, it counts it
 * in dp_ret[C's cookie].pending instead of making the connection sticky.
 * dp_rsp_verdict sees every byte Envoy sends to C (the kernel's own replies
 * and the app's responses are redirected into C's ingress by sk_msg and never
 * pass it), parses the response framing (status line, 1xx, Content-Length,
 * chunked up to the last chunk and its trailers, HEAD/204/304 without body)
 * and counts each complete response off. The next request takes the kernel
 * path only when nothing is pending. Order: sk_msg runs with C's socket lock
 * held (tcp_bpf_sendmsg), and the verdict runs from C's data_ready under the
 * same lock (softirq bh-lock or the owner's backlog), where it also queues the
 * bytes into C's ingress; so when sk_msg sees pending == 0, Envoy's last
 * response is already queued ahead of anything the kernel queues later.
 * Anything the parser cannot follow (101, no length, odd framing, a response
 * nobody asked for, too many small pieces in one segment) marks the
 * connection lost: it stays with Envoy for good, as before this file.
 */
#ifndef L7FP_DP_RETURN_H
#define L7FP_DP_RETURN_H

#ifndef DP_RETURN
#define DP_RETURN 1 /* 0: a connection that went to Envoy stays there (sticky) */
#endif
#ifndef DP_RET_MAX
#define DP_RET_MAX 16 /* requests outstanding at Envoy on one connection (<= 32) */
#endif
#ifndef DP_RSP_ITERS
#define DP_RSP_ITERS 2 /* pieces per invocation: up to DP_RSP_CHUNK head bytes or one body skip */
#endif
#ifndef DP_RSP_CHUNK
#define DP_RSP_CHUNK 64 /* verifier: ~170k insns for 2 x 64, over 1M for 4 x 64 */
#endif

#define DP_F_RET 256u /* dp_conn.flags: dp_ret holds requests outstanding at Envoy (other bits: datapath.h, dp_timeout.h) */

/* Reasons (dp_stat_key.reason), see fastpath/counters.py */
#define DP_R_ENVOY_PENDING 24 /* Envoy still owes a response on this connection */
#define DP_R_RSP_LOST 25      /* Envoy's responses could not be followed: sticky */

/* response parser states */
#define DP_RS_STATUS 0
#define DP_RS_HSTART 1
#define DP_RS_HNAME 2
#define DP_RS_HVAL 3
#define DP_RS_BODY 4
#define DP_RS_CSIZE 5
#define DP_RS_CEXT 6
#define DP_RS_CDATA 7
#define DP_RS_TRAILER 8
#define DP_RS_LOST 9
/* events: the byte loop stops on them and dp_rsp_event handles them once, so
 * the verifier does not walk their branches for every byte */
#define DP_RS_EV_HEAD 10  /* blank line after the headers */
#define DP_RS_EV_VALUE 11 /* end of a header line */
#define DP_RS_EV_CHUNK 12 /* end of a chunk-size line */
#define DP_RS_EV_DONE 13  /* blank line after the trailers: response complete */

/* header whose value is being read */
#define DP_RH_OTHER 0
#define DP_RH_CL 1
#define DP_RH_TE 2

/* FNV-1a 32 of the bytes | 0x20 (checked by tests/kernel_datapath/test_units.py) */
#define DP_RFNV_INIT 0x811c9dc5u
#define DP_RFNV_PRIME 0x01000193u
#define DP_H_CONTENT_LENGTH 0x4df9451du
#define DP_H_TRANSFER_ENCODING 0xddb4744cu
#define DP_H_CHUNKED 0xd31f4213u

#define DP_NUM_MAX (1ull << 40) /* a larger length is not followed (lost) */

struct dp_ret {
    __u32 pending;   /* requests handed to Envoy whose response is not complete */
    __u32 head_mask; /* bit i: the i-th oldest pending request is a HEAD */
    __u32 state;     /* DP_RS_* */
    __u32 pos;       /* status line: bytes seen; values/chunk lines: digits seen */
    __u32 status;
    __u32 hkind;     /* DP_RH_* */
    __u32 hash;      /* FNV-1a of the header name, then of the TE value */
    __u32 have_cl;
    __u32 chunked;
    __u32 done;      /* responses completed (tests, debugging) */
    __u32 off;       /* scratch of dp_rsp_verdict: bytes of the segment used */
    __u32 flags_scan; /* 1: a segment is being scanned (tail calls continue it) */
    __u64 num;       /* Content-Length or chunk size being read */
    __u64 rem;       /* body bytes (or chunk bytes + CRLF) still to come */
};

/* C's socket cookie -> its Envoy responses; sk_skb programs cannot use
 * sk_storage, so a hash (deleted by sock_ops when C closes). */
/* not preallocated: only connections that went to Envoy have an entry */
BPF_F_TABLE("hash", __u64, struct dp_ret, dp_ret, DP_MAX_CONNS, BPF_F_NO_PREALLOC);

/* ---- sk_msg side (called by dp_msg_verdict with C's lock held) ---------- */

/* 1: the request at the head of the write may not take the kernel path
 * because Envoy still owes responses; 2: Envoy's responses were lost
 * (the connection becomes sticky); 0: go on. */
static __always_inline int dp_ret_busy(struct dp_conn *c)
{
    if (!(c->flags & DP_F_RET))
        return 0;
    __u64 ck = c->cookie;
    struct dp_ret *r = dp_ret.lookup(&ck);
    if (!r)
        return 2;
    if (r->state == DP_RS_LOST)
        return 2;
    if (r->pending)
        return 1;
    c->flags &= ~DP_F_RET; /* all answered: back to the kernel */
    return 0;
}

/* Is the write exactly one whole request the decision framed (consumed > 0:
 * parsed head, Content-Length body or none)? Then Envoy's response to it can
 * be followed. `data` is the pulled start of the write. */
static __always_inline int dp_ret_trackable(struct dp_verdict *v, __u32 size)
{
#if !DP_RETURN
    return 0;
#endif
    return v->consumed > 0 && v->consumed == size;
}

static __always_inline int dp_ret_is_head(void *data, void *data_end)
{
    __u8 *p = data;
    if ((void *)(p + 5) > data_end)
        return 0;
    return p[0] == 'H' && p[1] == 'E' && p[2] == 'A' && p[3] == 'D' && p[4] == ' ';
}

/* Count one request handed to Envoy. Returns 0, or -1 when it cannot be
 * counted (table full, too many outstanding): the caller makes C sticky. */
static __always_inline int dp_ret_push(struct dp_conn *c, int is_head)
{
    __u64 ck = c->cookie;
    struct dp_ret *r = dp_ret.lookup(&ck);
    if (!r) {
        struct dp_ret z = {};
        if (dp_ret.insert(&ck, &z) != 0)
            return -1;
        r = dp_ret.lookup(&ck);
        if (!r)
            return -1;
    }
    if (r->state == DP_RS_LOST || r->pending >= DP_RET_MAX)
        return -1;
    if (is_head)
        r->head_mask |= 1u << (r->pending & 31);
    r->pending += 1;
    c->flags |= DP_F_RET;
    return 0;
}

/* sock_ops, C closing: its entry goes (nothing more is decided on C). */
static __always_inline void dp_ret_forget(struct dp_conn *c)
{
    __u64 ck = c->cookie;
    dp_ret.delete(&ck); /* also once nothing is pending: the entry stays till close */
    c->flags &= ~DP_F_RET;
}

/* ---- sk_skb side: Envoy's bytes arriving on C --------------------------- */

static __always_inline void dp_rsp_reset(struct dp_ret *r)
{
    r->state = DP_RS_STATUS;
    r->pos = 0;
    r->status = 0;
    r->have_cl = 0;
    r->chunked = 0;
    r->num = 0;
    r->rem = 0;
}

static __always_inline void dp_rsp_complete(struct dp_ret *r)
{
    if (!r->pending) {
        r->state = DP_RS_LOST; /* a response nobody asked for */
        return;
    }
    r->pending -= 1;
    r->head_mask >>= 1;
    r->done += 1;
    dp_rsp_reset(r);
}

/* The blank line after the headers: how is the body framed? */
static __always_inline void dp_rsp_head_done(struct dp_ret *r)
{
    __u32 st = r->status;
    if (st < 100 || st == 101) {
        r->state = DP_RS_LOST; /* not a status, or a protocol switch */
        return;
    }
    if (st < 200) {
        dp_rsp_reset(r); /* interim (100 Continue...): the final response follows */
        return;
    }
    if ((r->head_mask & 1) || st == 204 || st == 304) {
        dp_rsp_complete(r);
        return;
    }
    if (r->chunked) {
        r->state = DP_RS_CSIZE;
        r->num = 0;
        r->pos = 0;
        return;
    }
    if (!r->have_cl) {
        r->state = DP_RS_LOST; /* body until close */
        return;
    }
    if (!r->num) {
        dp_rsp_complete(r);
        return;
    }
    r->rem = r->num;
    r->state = DP_RS_BODY;
}

static __always_inline void dp_rsp_value_end(struct dp_ret *r)
{
    if (r->hkind == DP_RH_CL) {
        if (!r->pos || r->have_cl) {
            r->state = DP_RS_LOST; /* empty or repeated Content-Length */
            return;
        }
        r->have_cl = 1;
    } else if (r->hkind == DP_RH_TE) {
        if (r->hash != DP_H_CHUNKED) {
            r->state = DP_RS_LOST; /* another coding: not followed */
            return;
        }
        r->chunked = 1;
    }
    r->state = DP_RS_HSTART;
}

static __always_inline void dp_rsp_chunk_line_end(struct dp_ret *r)
{
    if (!r->pos) {
        r->state = DP_RS_LOST;
        return;
    }
    if (!r->num) {
        r->state = DP_RS_TRAILER; /* last chunk: trailers, then a blank line */
        r->pos = 0;
        return;
    }
    r->rem = r->num + 2; /* data and its CRLF */
    r->state = DP_RS_CDATA;
}

static __always_inline int dp_rsp_hex(__u8 b)
{
    if (b >= '0' && b <= '9')
        return b - '0';
    __u8 l = b | 0x20;
    if (l >= 'a' && l <= 'f')
        return l - 'a' + 10;
    return -1;
}

/* One byte of a status line, header or chunk-size line. */
static __always_inline void dp_rsp_byte(struct dp_ret *r, __u8 b)
{
    __u32 st = r->state;
    if (st == DP_RS_STATUS) {
        __u32 p = r->pos;
        if (b == '\n') {
            r->state = p >= 12 ? DP_RS_HSTART : DP_RS_LOST;
        } else if (p == 0 && b != 'H') {
            r->state = DP_RS_LOST;
        } else if (p >= 9 && p <= 11) {
            if (b < '0' || b > '9')
                r->state = DP_RS_LOST;
            r->status = r->status * 10 + (b - '0');
        }
        r->pos = p + 1;
    } else if (st == DP_RS_HSTART) {
        if (b == '\n') {
            r->state = DP_RS_EV_HEAD;
        } else if (b != '\r') {
            r->hash = (DP_RFNV_INIT ^ (b | 0x20)) * DP_RFNV_PRIME;
            r->state = DP_RS_HNAME;
        }
    } else if (st == DP_RS_HNAME) {
        if (b == ':') {
            __u32 h = r->hash;
            r->hkind = h == DP_H_CONTENT_LENGTH ? DP_RH_CL
                       : h == DP_H_TRANSFER_ENCODING ? DP_RH_TE : DP_RH_OTHER;
            r->hash = DP_RFNV_INIT;
            r->num = r->have_cl ? r->num : 0;
            r->pos = 0;
            r->state = DP_RS_HVAL;
        } else if (b == '\n') {
            r->state = DP_RS_LOST;
        } else {
            r->hash = (r->hash ^ (b | 0x20)) * DP_RFNV_PRIME;
        }
    } else if (st == DP_RS_HVAL) {
        if (b == '\n') {
            r->state = DP_RS_EV_VALUE;
        } else if (b == '\r' || b == ' ' || b == '\t') {
        } else if (r->hkind == DP_RH_CL) {
            if (b < '0' || b > '9' || r->num > DP_NUM_MAX || r->have_cl)
                r->state = DP_RS_LOST;
            r->num = r->num * 10 + (b - '0');
            r->pos = 1;
        } else if (r->hkind == DP_RH_TE) {
            r->hash = (r->hash ^ (b | 0x20)) * DP_RFNV_PRIME;
        }
    } else if (st == DP_RS_CSIZE) {
        int d = dp_rsp_hex(b);
        if (d >= 0) {
            if (r->num > DP_NUM_MAX)
                r->state = DP_RS_LOST;
            r->num = r->num * 16 + d;
            r->pos = 1;
        } else if (b == ';') {
            r->state = DP_RS_CEXT;
        } else if (b == '\n') {
            r->state = DP_RS_EV_CHUNK;
        } else if (b != '\r' && b != ' ' && b != '\t') {
            r->state = DP_RS_LOST;
        }
    } else if (st == DP_RS_CEXT) {
        if (b == '\n')
            r->state = DP_RS_EV_CHUNK;
    } else if (st == DP_RS_TRAILER) {
        if (b == '\n') {
            if (!r->pos)
                r->state = DP_RS_EV_DONE;
            r->pos = 0;
        } else if (b != '\r') {
            r->pos = 1;
        }
    }
}

/* The transition an event state stands for (see DP_RS_EV_*). */
static __always_inline void dp_rsp_event(struct dp_ret *r)
{
    __u32 st = r->state;
    if (st == DP_RS_EV_HEAD)
        dp_rsp_head_done(r);
    else if (st == DP_RS_EV_VALUE)
        dp_rsp_value_end(r);
    else if (st == DP_RS_EV_CHUNK)
        dp_rsp_chunk_line_end(r);
    else if (st == DP_RS_EV_DONE)
        dp_rsp_complete(r);
}

/* Skip body bytes of a BODY / CDATA state; returns the bytes skipped. */
static __always_inline __u32 dp_rsp_skip(struct dp_ret *r, __u32 avail)
{
    __u64 n = r->rem < avail ? r->rem : avail;
    r->rem -= n;
    if (!r->rem) {
        if (r->state == DP_RS_BODY) {
            dp_rsp_complete(r);
        } else {
            r->state = DP_RS_CSIZE;
            r->num = 0;
            r->pos = 0;
        }
    }
    return (__u32)n;
}

/* Up to DP_RSP_CHUNK head bytes at `off`; returns the bytes used (it stops
 * early when a body starts, so the caller skips the body arithmetically). */
static __always_inline __u32 dp_rsp_bytes(struct __sk_buff *skb, struct dp_ret *r, __u32 off,
                                          __u32 len)
{
    __u8 buf[2 * DP_RSP_CHUNK];
    __u32 n = len - off;
    if (n > DP_RSP_CHUNK)
        n = DP_RSP_CHUNK;
    asm volatile("" : "+r"(n)); /* clang forgets n <= CHUNK, so the mask stays for the verifier */
    n &= 2 * DP_RSP_CHUNK - 1;
    if (n == 0 || bpf_skb_load_bytes(skb, off, buf, n) != 0) {
        r->state = DP_RS_LOST;
        return 0;
    }
    __u32 i = 0;
    for (; i < DP_RSP_CHUNK; i++) {
        if (i >= n)
            break;
        /* clang must not carry parser fields in registers from byte to byte:
         * their known values would make every path a new verifier state */
        asm volatile("" ::: "memory");
        dp_rsp_byte(r, buf[i]);
        asm volatile("" ::: "memory");
        __u32 st = r->state;
        if (st == DP_RS_BODY || st == DP_RS_CDATA || st >= DP_RS_LOST) {
            i++;
            break;
        }
    }
    return i;
}

#ifndef DP_RSP_BASE
#define DP_RSP_BASE 0 /* where the payload starts in the skb (14 in the sched_cls test harness) */
#endif

/* Itself, for the next DP_RSP_ITERS pieces of a long segment (the verifier
 * walks one invocation; a tail call starts a fresh one, at most 33 in all).
 * The loader (or the test harness) puts the program into dp_rsp_prog[0]. */
BPF_PROG_ARRAY(dp_rsp_prog, 1);

/* Follow the response bytes of one received segment for entry `key` of
 * dp_ret. Shared by dp_rsp_verdict and the test harness (test_return.c). */
static __always_inline void dp_rsp_scan(struct __sk_buff *skb, __u64 key)
{
    struct dp_ret *r = dp_ret.lookup(&key);
    if (!r || r->state == DP_RS_LOST)
        return;
    __u32 len = skb->len;
    if (!(r->flags_scan & 1)) {
        r->off = DP_RSP_BASE; /* first invocation for this segment */
        r->flags_scan = 1;
    }
    for (int k = 0; k < DP_RSP_ITERS; k++) {
        /* off lives in the map value: the verifier then sees one unknown
         * offset per iteration instead of one state per possible value */
        __u32 off = r->off;
        if (off >= len || r->state == DP_RS_LOST) {
            r->flags_scan = 0;
            return;
        }
        __u32 st = r->state;
        if (st == DP_RS_BODY || st == DP_RS_CDATA) {
            r->off = off + dp_rsp_skip(r, len - off);
        } else {
            r->off = off + dp_rsp_bytes(skb, r, off, len);
            dp_rsp_event(r);
        }
    }
    if (r->off < len && r->state != DP_RS_LOST)
        dp_rsp_prog.call(skb, 0);
    if (r->off < len)
        r->state = DP_RS_LOST; /* more pieces than 33 invocations take */
    r->flags_scan = 0;
}

/* sk_skb verdict on client sockets (dp_cli): Envoy's bytes to C. Always
 * SK_PASS (into C's own receive queue); only follows the framing. */
int dp_rsp_verdict(struct __sk_buff *skb)
{
    dp_rsp_scan(skb, bpf_get_socket_cookie(skb));
    return SK_PASS;
}

#endif
