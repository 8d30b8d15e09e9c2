/* x-forwarded-proto and x-request-id on requests the kernel forwards, as the
 * client's Envoy (HttpConnectionManager) adds them.
 *
 * Owner: NAME=xrid. Included by dp_decide_l7fp.h after dp_hop.h (it needs the
 * parsed request in l7fp_decide's per-CPU context); dp_msg_act (sk_msg.c)
 * calls dp_xrid_act on a FORWARD, after dp_hop_act and before the route's
 * header inserts (dp_act_send). fastpath/request_id.py is the same rule in
 * Python (the reference model's) and says which HCM settings keep a
 * listener with Envoy (the kernel implements only this one behaviour).
 *
 * What Envoy 1.40 does with an HTTP/1.1 request on an HCM with
 * use_remote_address off (Istio's sidecars, the local mesh's), seen with the
 * binary (tests/split/test_request_id_envoy.py): a request without
 * x-forwarded-proto gets "x-forwarded-proto: http" appended after the
 * client's headers; one without x-request-id then gets
 * "x-request-id: <UUID v4, lower-case hex>"; a header the client sent is kept
 * as it is (name, value, place). Both come before the router's own headers
 * (x-envoy-expected-rq-timeout-ms, then the route's request_headers_to_add:
 * the route's blob holds them in Envoy's order, fastpath/classify_route.py),
 * so they are inserted at the end of the client's head, before that blob.
 * Kernel replies get neither (Envoy's local replies have no upstream).
 *
 * HCM tracing (-DDP_TRACE=1, fastpath/tracing.py says what Envoy does): the
 * id's version digit carries Envoy's sampling decision computed from the id,
 * requests with trace headers go to Envoy; with the Zipkin tracer
 * (-DDP_TRACE_ZIPKIN=1) an unsampled request gets the b3 lines, a sampled one
 * goes to Envoy with its id. dp_trace_of (dp_decide_l7fp.h) reads the
 * listener's setting.
 *
 * The UUID: 128 bits of bpf_get_prandom_u32 (per-CPU, not a CSPRNG; Envoy
 * uses BoringSSL's), version 4 and variant 10xx set as RFC 4122 says. Built
 * straight into the message (no map, no stack buffer: dp_act_send is close to
 * the 512-byte stack limit), one push for both lines.
 */
#ifndef DP_XRID_H
#define DP_XRID_H

#ifndef DP_XRID
#define DP_XRID 1 /* 0: the data path adds neither header (the cost measured without) */
#endif
#ifndef DP_TRACE
#define DP_TRACE 0 /* 1: a listener of the plan has HCM tracing (fastpath.agent sets it) */
#endif
#ifndef DP_TRACE_ZIPKIN
#define DP_TRACE_ZIPKIN 0 /* 1: ... with the Zipkin provider (b3 lines, sampled ones to Envoy) */
#endif

#define DP_XRID_HAS_RID 1 /* dp_verdict.xrid: the client sent x-request-id */
#define DP_XRID_HAS_XFP 2 /* ... and x-forwarded-proto */
#define DP_XRID_HAS_TRACE 4 /* ... x-client-trace-id, x-envoy-force-trace or x-envoy-decorator-operation */
#define DP_R_TRACE 17 /* tracing listener: the request carries a header that changes Envoy's decision */
#define DP_TRACE_DEN 10000 /* Envoy's TEN_THOUSAND: r = the id's first 32 bits % 10000 */
#define DP_XRID_XFP_LEN 25 /* "x-forwarded-proto: http\r\n" */
#define DP_XRID_RID_LEN 52 /* "x-request-id: " + 36 + "\r\n" */
#define DP_B3_LEN 80 /* "x-b3-traceid: " 16 "\r\n", "x-b3-spanid: " 16 "\r\n", "x-b3-sampled: 0\r\n" */
#define DP_XRID_MAX (DP_XRID_XFP_LEN + DP_XRID_RID_LEN + DP_TRACE_ZIPKIN * DP_B3_LEN)
#define DP_TRACE_F_ZIPKIN 0x10000u /* l7fp_listener.trace: the listener's tracer is Zipkin */
#define DP_XRID_SAMPLED 8 /* dp_verdict.xrid, set by dp_xrid_insert: the id it made is sampled */
#define DP_XRID_B3 16     /* ... and it appended the b3 lines (DP_B3_LEN, after the head's end) */
#define DP_R_TRACE_SAMPLED 31 /* Zipkin listener, sampled id: Envoy reports the span */
_Static_assert((DP_HDR_MAX & (DP_HDR_MAX - 1)) == 0, "dp_xrid_insert masks offsets with DP_HDR_MAX - 1");

#define DP_W_X_REQUES L7FP_W8('x', '-', 'r', 'e', 'q', 'u', 'e', 's')
#define DP_W_QUEST_ID L7FP_W8('q', 'u', 'e', 's', 't', '-', 'i', 'd')
#define DP_W_X_FORWAR L7FP_W8('x', '-', 'f', 'o', 'r', 'w', 'a', 'r')
#define DP_W_DED_PROT L7FP_W8('d', 'e', 'd', '-', 'p', 'r', 'o', 't')
#define DP_W_ED_PROTO L7FP_W8('e', 'd', '-', 'p', 'r', 'o', 't', 'o')
#define DP_W_X_CLIENT L7FP_W8('x', '-', 'c', 'l', 'i', 'e', 'n', 't')
#define DP_W_IENT_TRA L7FP_W8('i', 'e', 'n', 't', '-', 't', 'r', 'a')
#define DP_W_TRACE_ID L7FP_W8('t', 'r', 'a', 'c', 'e', '-', 'i', 'd')
#define DP_W_X_ENVOY_ L7FP_W8('x', '-', 'e', 'n', 'v', 'o', 'y', '-')
#define DP_W_FORCE_TR L7FP_W8('f', 'o', 'r', 'c', 'e', '-', 't', 'r')
#define DP_W_CE_TRACE L7FP_W8('c', 'e', '-', 't', 'r', 'a', 'c', 'e')
#define DP_W_DECORATO L7FP_W8('d', 'e', 'c', 'o', 'r', 'a', 't', 'o')
#define DP_W_R_OPERAT L7FP_W8('r', '-', 'o', 'p', 'e', 'r', 'a', 't')
#define DP_W_PERATION L7FP_W8('p', 'e', 'r', 'a', 't', 'i', 'o', 'n')

/* DP_XRID_HAS_TRACE for a line of length `len` whose words at 0, 4, 8 and 9
 * are given: x-client-trace-id (17), x-envoy-force-trace (19),
 * x-envoy-decorator-operation (27), every byte compared. */
static __always_inline __u64 dp_trace_line(struct l7fp_req_ctx *c, __u64 s, __u64 len, __u64 w0,
                                           __u64 w4, __u64 w8, __u64 w9)
{
#if DP_TRACE
    __u64 w11 = l7fp_lower64(l7fp_load64(c, s + 11));
    __u64 w16 = l7fp_lower64(l7fp_load64(c, s + 16));
    __u64 w19 = l7fp_lower64(l7fp_load64(c, s + 19));
    __u64 ctid = L7FP_EQ(len, 17) & dp_hop_eq64(w0, DP_W_X_CLIENT) & dp_hop_eq64(w4, DP_W_IENT_TRA) &
                 dp_hop_eq64(w9, DP_W_TRACE_ID);
    __u64 envoy = dp_hop_eq64(w0, DP_W_X_ENVOY_);
    __u64 force = L7FP_EQ(len, 19) & envoy & dp_hop_eq64(w8, DP_W_FORCE_TR) & dp_hop_eq64(w11, DP_W_CE_TRACE);
    __u64 deco = L7FP_EQ(len, 27) & envoy & dp_hop_eq64(w8, DP_W_DECORATO) &
                 dp_hop_eq64(w16, DP_W_R_OPERAT) & dp_hop_eq64(w19, DP_W_PERATION);
    return (ctid | force | deco) * DP_XRID_HAS_TRACE;
#else
    return 0;
#endif
}

#define DP_W_X_B3_ L7FP_W8('x', '-', 'b', '3', '-', 0, 0, 0)
#define DP_W_TRACEPAR L7FP_W8('t', 'r', 'a', 'c', 'e', 'p', 'a', 'r')
#define DP_W_CEPARENT L7FP_W8('c', 'e', 'p', 'a', 'r', 'e', 'n', 't')
#define DP_W_TRACESTA L7FP_W8('t', 'r', 'a', 'c', 'e', 's', 't', 'a')
#define DP_W_ACESTATE L7FP_W8('a', 'c', 'e', 's', 't', 'a', 't', 'e')

/* DP_XRID_HAS_TRACE for a line whose name (`len` bytes at s) carries Zipkin
 * trace context: x-b3-* (the 5 bytes of the prefix: a shorter name ends in
 * ':' there), b3, traceparent, tracestate. Compiled in with DP_TRACE_ZIPKIN. */
static __always_inline __u32 dp_b3_line(struct l7fp_req_ctx *c, __u64 s, __u64 len)
{
#if DP_TRACE_ZIPKIN
    __u64 w0 = l7fp_lower64(l7fp_load64(c, s));
    __u64 w2 = l7fp_lower64(l7fp_load64(c, s + 2));
    __u64 w3 = l7fp_lower64(l7fp_load64(c, s + 3));
    __u64 x_b3 = dp_hop_eq64(w0 & 0xffffffffffULL, DP_W_X_B3_);
    __u64 b3 = L7FP_EQ(len, 2) & dp_hop_eq64(w0 & 0xffffULL, 'b' | '3' << 8);
    __u64 tp = L7FP_EQ(len, 11) & dp_hop_eq64(w0, DP_W_TRACEPAR) & dp_hop_eq64(w3, DP_W_CEPARENT);
    __u64 ts = L7FP_EQ(len, 10) & dp_hop_eq64(w0, DP_W_TRACESTA) & dp_hop_eq64(w2, DP_W_ACESTATE);
    return (__u32)((x_b3 | b3 | tp | ts) * DP_XRID_HAS_TRACE);
#else
    return 0;
#endif
}

/* DP_XRID_HAS_* of header line k (0: neither). Branch-free past the length
 * test, as dp_hop_line: a branch per case multiplies the verifier's paths. */
static __always_inline __u32 dp_xrid_line(struct l7fp_req_ctx *c, __u32 k)
{
    struct l7fp_req *r = &c->r;
    __u64 s = r->ls[k & L7FP_LINE_MASK], len = r->lc[k & L7FP_LINE_MASK] - s;
    __u64 l12 = L7FP_EQ(len, 12), l17 = L7FP_EQ(len, 17);
#if DP_TRACE
    __u32 b3 = dp_b3_line(c, s, len);
    if (!(l12 | l17 | L7FP_EQ(len, 19) | L7FP_EQ(len, 27)))
        return b3;
#else
    if (!(l12 | l17))
        return 0; /* most lines end here */
#endif
    __u64 w0 = l7fp_lower64(l7fp_load64(c, s));
    __u64 w4 = l7fp_lower64(l7fp_load64(c, s + 4));
    __u64 w8 = l7fp_lower64(l7fp_load64(c, s + 8));
    __u64 w9 = l7fp_lower64(l7fp_load64(c, s + 9));
    __u64 rid = l12 & dp_hop_eq64(w0, DP_W_X_REQUES) & dp_hop_eq64(w4, DP_W_QUEST_ID);
    __u64 xfp = l17 & dp_hop_eq64(w0, DP_W_X_FORWAR) & dp_hop_eq64(w8, DP_W_DED_PROT) &
                dp_hop_eq64(w9, DP_W_ED_PROTO);
#if !DP_TRACE
    __u32 b3 = 0;
#endif
    return (__u32)(rid * DP_XRID_HAS_RID + xfp * DP_XRID_HAS_XFP + dp_trace_line(c, s, len, w0, w4, w8, w9)) | b3;
}

/* Which of the two headers the request carries, into v->xrid. Called by
 * dp_msg_act on a FORWARD, before anything changes the message (the parsed
 * lines are in the context's copy of the head). */
static __always_inline void dp_xrid_scan(struct dp_verdict *v)
{
    v->xrid = DP_XRID_HAS_RID | DP_XRID_HAS_XFP; /* not parsed: add nothing */
#if DP_XRID
    struct l7fp_req_ctx *c = l7fp_ctx_get();
    if (!c)
        return;
    struct l7fp_req *r = &c->r;
    __u32 seen = 0;
    for (__u32 k = 1; k < L7FP_MAX_LINES; k++) {
        asm volatile("" ::: "memory");
        if (k >= r->nlines)
            break;
        seen |= dp_xrid_line(c, k);
    }
    v->xrid = seen;
#endif
}

/* The 8 lower-case hex digits of w as 8 bytes in memory order (most
 * significant digit first), computed in one register: a digit at a time took
 * dp_msg_act past the 512-byte stack (clang spilled the digits). */
static __always_inline __u64 dp_xrid_hex8(__u32 w)
{
    __u64 x = w;
    x = (x | x << 16) & 0x0000ffff0000ffffULL; /* byte k of the result holds digit k ... */
    x = (x | x << 8) & 0x00ff00ff00ff00ffULL;
    x = (x | x << 4) & 0x0f0f0f0f0f0f0f0fULL;
    x = __builtin_bswap64(x);                  /* ... and digit 7 (the first) goes first */
    __u64 letter = ((x + 0x0606060606060606ULL) >> 4) & 0x0101010101010101ULL; /* digit > 9 */
    return x + 0x3030303030303030ULL + letter * ('a' - '0' - 10);
}

/* Envoy's sampling decision for an id whose first 32 bits are `a`, on a
 * listener whose dp_verdict.trace is `trace` (ListenerPlan.trace_sampling in
 * the low 16 bits, 0 without tracing): a % 10000 < sampling. */
static __always_inline __u32 dp_trace_sampled(__u32 a, __u32 trace)
{
#if DP_TRACE
    return (a % DP_TRACE_DEN) < (trace & 0xffffu);
#else
    return 0;
#endif
}

/* The b3 lines of a new, unsampled Zipkin trace at p (the caller checked
 * p + DP_B3_LEN): trace id = span id = 64 random bits as 16 hex digits
 * (Envoy's ZipkinConfig defaults: trace_id_128bit off, shared_span_context). */
static __always_inline void dp_b3_write(__u8 *p)
{
    __u64 hi = dp_xrid_hex8(bpf_get_prandom_u32()), lo = dp_xrid_hex8(bpf_get_prandom_u32());
    *(__u64 *)p = L7FP_W8('x', '-', 'b', '3', '-', 't', 'r', 'a');
    *(__u32 *)(p + 8) = 'c' | 'e' << 8 | 'i' << 16 | 'd' << 24;
    p[12] = ':';
    p[13] = ' ';
    *(__u64 *)(p + 14) = hi;
    *(__u64 *)(p + 22) = lo;
    p[30] = '\r';
    p[31] = '\n';
    *(__u64 *)(p + 32) = L7FP_W8('x', '-', 'b', '3', '-', 's', 'p', 'a');
    *(__u32 *)(p + 40) = 'n' | 'i' << 8 | 'd' << 16 | ':' << 24;
    p[44] = ' ';
    *(__u64 *)(p + 45) = hi;
    *(__u64 *)(p + 53) = lo;
    p[61] = '\r';
    p[62] = '\n';
    *(__u64 *)(p + 63) = L7FP_W8('x', '-', 'b', '3', '-', 's', 'a', 'm');
    *(__u64 *)(p + 71) = L7FP_W8('p', 'l', 'e', 'd', ':', ' ', '0', '\r');
    p[79] = '\n';
}

/* The 36 characters of a fresh UUID v4 at p (the caller checked p + 36):
 * 8-4-4-4-12 digits, the first 32 bits `a`, the version digit 4 (9 when
 * `sampled`: UUIDRequestIDExtension::setTraceReason), the variant digit 8-b
 * (RFC 4122). */
static __always_inline void dp_xrid_uuid(__u8 *p, __u32 a, __u32 sampled)
{
    __u32 ver = 0x4000u + sampled * 0x5000u; /* 4, or 9 */
    __u32 b = (bpf_get_prandom_u32() & 0xffff0fffu) | ver;
    __u32 c = (bpf_get_prandom_u32() & 0x3fffffffu) | 0x80000000u;
    __u64 hb = dp_xrid_hex8(b), hc = dp_xrid_hex8(c);
    *(__u64 *)p = dp_xrid_hex8(a);
    p[8] = '-';
    *(__u32 *)(p + 9) = (__u32)hb;
    p[13] = '-';
    *(__u32 *)(p + 14) = (__u32)(hb >> 32);
    p[18] = '-';
    *(__u32 *)(p + 19) = (__u32)hc;
    p[23] = '-';
    *(__u32 *)(p + 24) = (__u32)(hc >> 32);
    *(__u64 *)(p + 28) = dp_xrid_hex8(bpf_get_prandom_u32());
}

/* Insert the lines the request lacks at head_len - 2 (the end of the
 * client's head, before the route's headers) of a write of `size` bytes.
 * One pull from the start, then the writes at their offset: pulling the new
 * lines alone left msg->data there (a HEAD read as a GET after it), and a
 * second pull from the start copied the head once more. Returns the bytes
 * inserted (0: the client sent both), or -1 when the message is no longer
 * usable (the caller sends it to Envoy). */
static __always_inline int dp_xrid_insert(struct sk_msg_md *msg, struct dp_verdict *v, __u32 size)
{
#if DP_XRID
    __u32 xfp = !(v->xrid & DP_XRID_HAS_XFP), rid = !(v->xrid & DP_XRID_HAS_RID);
    __u32 a = bpf_get_prandom_u32(); /* the id's first 32 bits: the decision is taken from them */
    __u32 sampled = rid & dp_trace_sampled(a, v->trace);
    __u32 b3 = 0;
#if DP_TRACE_ZIPKIN
    b3 = rid & !sampled & !!(v->trace & DP_TRACE_F_ZIPKIN);
#endif
    v->xrid |= sampled * DP_XRID_SAMPLED | b3 * DP_XRID_B3;
    __u32 len = xfp * DP_XRID_XFP_LEN + rid * DP_XRID_RID_LEN + b3 * DP_B3_LEN;
    if (!len)
        return 0;
    if (v->head_len < 4)
        return -1;
    __u32 at = v->head_len - 2; /* < DP_HDR_MAX: the decision parsed the head there */
    size += len;
    __u32 want = size < DP_HDR_MAX + DP_XRID_MAX ? size : DP_HDR_MAX + DP_XRID_MAX;
    if (at >= DP_HDR_MAX || bpf_msg_push_data(msg, at, len, 0) || bpf_msg_pull_data(msg, 0, want, 0))
        return -1;
    __u64 off = at;
    asm volatile("%0 &= %1" : "+r"(off) : "i"(DP_HDR_MAX - 1)); /* the verifier's bound */
    __u8 *d = (__u8 *)(long)msg->data + off;
    if (xfp) {
        if ((void *)(d + DP_XRID_XFP_LEN) > msg->data_end)
            return -1;
        *(__u64 *)d = DP_W_X_FORWAR;
        *(__u64 *)(d + 8) = L7FP_W8('d', 'e', 'd', '-', 'p', 'r', 'o', 't');
        *(__u64 *)(d + 16) = L7FP_W8('o', ':', ' ', 'h', 't', 't', 'p', '\r');
        d[24] = '\n';
    }
    if (rid) {
        __u8 *p = d + (DP_XRID_XFP_LEN & -xfp);
        if ((void *)(p + DP_XRID_RID_LEN) > msg->data_end)
            return -1;
        *(__u64 *)p = DP_W_X_REQUES;
        *(__u32 *)(p + 8) = 't' | '-' << 8 | 'i' << 16 | 'd' << 24;
        p[12] = ':';
        p[13] = ' ';
        dp_xrid_uuid(p + 14, a, sampled);
        p[50] = '\r';
        p[51] = '\n';
    }
#if DP_TRACE_ZIPKIN
    if (b3) {
        __u8 *q = d + (DP_XRID_XFP_LEN & -xfp) + DP_XRID_RID_LEN;
        if ((void *)(q + DP_B3_LEN) > msg->data_end)
            return -1;
        dp_b3_write(q);
    }
#endif
    return (int)len;
#else
    return 0;
#endif
}

/* In dp_msg_act after dp_hop_act, on dp_msg_verdict's per-CPU verdict `v` and
 * write size `size`: a FORWARD gets the lines it lacks. On a tracing listener
 * (fastpath/tracing.py) a request with x-request-id or a header of
 * DP_XRID_HAS_TRACE becomes a PASS with reason DP_R_TRACE (Envoy marks or
 * removes them), as dp_hop_act's PASS: not sticky. As in dp_hop_act, the
 * lengths are updated in the scratch (memory) and read back from there, so the
 * verifier walks the rest of dp_msg_act once whatever was inserted. Inserting
 * before the checks that may still hand the request to Envoy is harmless:
 * that Envoy is the listener's own, which keeps both lines as they are
 * (fastpath/request_id.py keeps a listener that would not with Envoy). 0, or
 * -1 when the message is no longer usable. */
static __always_inline int dp_xrid_act(struct sk_msg_md *msg, struct dp_conn *conn,
                                       struct dp_verdict *v, __u32 *size)
{
    if (v->kind != DP_K_FORWARD)
        return 0;
    dp_xrid_scan(v);
    __u32 trace = dp_trace_of(conn);
    v->trace = trace ? trace - 1 : 0;
    if (trace && (v->xrid & (DP_XRID_HAS_RID | DP_XRID_HAS_TRACE))) {
        v->kind = DP_K_PASS;
        v->reason = DP_R_TRACE;
        return 0;
    }
    int n = dp_xrid_insert(msg, v, *size);
    if (n <= 0)
        return n;
    *size += n;
    v->consumed += n;
    /* the b3 lines stay past head_len: the route's lines go before them (Envoy's order) */
    v->head_len += n - ((v->xrid & DP_XRID_B3) ? DP_B3_LEN : 0);
#if DP_TRACE_ZIPKIN
    if ((v->trace & DP_TRACE_F_ZIPKIN) && (v->xrid & DP_XRID_SAMPLED)) {
        v->kind = DP_K_PASS; /* Envoy samples it from the id inserted here and reports the span */
        v->reason = DP_R_TRACE_SAMPLED;
    }
#endif
    return 0;
}

#endif /* DP_XRID_H */
