/* An upstream app that closes in the middle of a response: the kernel half.
 *
 * Owner: NAME=close (K2 data path). Pasted after dp_reset.h by
 * fastpath/loader.py; the agent half is fastpath/agent_close.py.
 *
 * Envoy 1.40 (seen with the binary, tests/kernel_datapath/test_close.py): when
 * the upstream connection closes (FIN or RST) after the response started and
 * before it is complete (Content-Length or chunked), Envoy closes the client's
 * connection with a FIN (about 1 s later, its delayed_close_timeout); when the
 * response was complete it keeps the client's connection. So the agent must
 * know, at U's EOF, whether the response passed whole. It never reads response
 * bytes; the response path (dp_srv_verdict paired, dp_skb_verdict unpaired)
 * counts them down in dp_peer[U].left, the value it already holds per write:
 * the first response write parses the head (dp_resp_total, the parser the
 * route timeouts use; the parse runs once, here, first thing in the program,
 * where the verifier meets one state, and the timer reads its result from the
 * per-CPU scratch: parsed after the retry decision it was walked once per
 * state the retry code leaves, over the 1M budget) and stores the bytes still
 * to come; every later write subtracts its size. DP_LEFT_UNKNOWN: a framing not
 * tracked (close-delimited, 1xx, a head longer than DP_RESP_HEAD or split
 * over writes): the agent then takes the close as the response's end and
 * closes the client (the client of a close-delimited response needs that
 * EOF; Envoy re-frames such a response and keeps the connection). A chunked
 * response is DP_LEFT_CHUNKED until a write of it ends with the last chunk
 * (dp_chunk_end; 0 then).
 *
 * The close itself is an EOF (recv returns 0), as Envoy's FIN: the agent makes
 * a carrier socket of its own, puts it into dp_up with dp_peer[carrier] =
 * {client, DP_WAIT_EOF} and shuts the other end down; the carrier's FIN comes
 * to dp_skb_verdict as an empty skb, which is redirected into the client's
 * receive queue behind the response bytes (dp_close_eof).
 */
#ifndef L7FP_DP_CLOSE_H
#define L7FP_DP_CLOSE_H

#define DP_F_CLOSE_AFTER 4096u  /* dp_conn.flags: close the client after this kernel reply */
#define DP_EV_CLOSE_REPLY 9     /* a kernel reply to a `Connection: close` request: the agent
                                 * closes the client's connection after it (agent_close.py) */

/* The first response write of a request (`total`: dp_resp_total's whole
 * length, 0 when not known from the head; `chunked`: the head says chunked,
 * whose end the caller looks for in the write). */
static __always_inline void dp_close_first(struct dp_peer_val *p, __u64 total, __u32 size,
                                           __u32 chunked)
{
    __u32 left = DP_LEFT_UNKNOWN;
    if (total && size >= total)
        left = 0;
    else if (total && total - size < DP_LEFT_CHUNKED)
        left = total - size;
    else if (chunked)
        left = DP_LEFT_CHUNKED;
    p->left = left;
}

/* A later response write of `size` bytes (`ends`: it ends with a chunked
 * body's last chunk; bytes past the end are not counted: a response to a
 * pipelined request is not forwarded on the fast path). */
static __always_inline void dp_close_more(struct dp_peer_val *p, __u32 size, __u32 ends)
{
    __u32 left = p->left;
    if (left == DP_LEFT_CHUNKED && ends)
        p->left = 0;
    if (!left || left >= DP_LEFT_CHUNKED)
        return;
    p->left = size >= left ? 0 : left - size;
}

/* "\r\n0\r\n\r\n": the end of a chunked body without trailers (the CRLF of
 * the chunk before, or of the head, then the last chunk). Compared whole: a
 * chunk whose data end so is taken for the end (then the client keeps its
 * connection at the app's close), trailers are not (then it is closed). */
static __always_inline __u32 dp_chunk_end(const __u8 *d)
{
    __u64 w = 0;
    __builtin_memcpy(&w, d, 7); /* one compare, not a branch per byte (verifier walk) */
    return w == 0x0a0d0a0d300a0dull;
}

/* The write ends a chunked body (asked only while one is in flight). */
static __always_inline __u32 dp_chunk_end_msg(struct sk_msg_md *msg, __u32 size)
{
    if (size < 7 || bpf_msg_pull_data(msg, size - 7, size, 0))
        return 0;
    __u8 *d = msg->data;
    if ((void *)(d + 7) > msg->data_end)
        return 0;
    return dp_chunk_end(d);
}

static __always_inline __u32 dp_chunk_end_skb(struct __sk_buff *skb, __u32 size)
{
    __u8 d[8] = {};
    if (size < 7 || bpf_skb_load_bytes(skb, size - 7, d, 7))
        return 0;
    return dp_chunk_end(d);
}

/* The head's first n bytes are in rb (rb NULL: not readable): its length
 * for dp_peer_val.left and the route timer (dp_resp_total_of). Returns 1
 * when the head says chunked (the caller looks at the write's end). */
static __always_inline __u32 dp_close_parsed(__u64 up, struct dp_peer_val *p, struct dp_rbuf *rb,
                                             __u32 n, __u32 first, __u32 size)
{
    if (!rb) {
        p->left = DP_LEFT_UNKNOWN;
        return 0;
    }
    rb->te = rb->head_len = 0; /* dp_resp_total sets them once the status line is one */
    __u64 total = dp_resp_total(rb, n, (first & DP_WAIT_HEAD) != 0);
    rb->up = up;
    rb->total = total;
    __u32 chunked = !total && *(volatile __u32 *)&rb->te && *(volatile __u32 *)&rb->head_len;
    dp_close_first(p, total, size, chunked);
    return chunked;
}

/* Before a first write's head is copied into the scratch: rb->up is set
 * again once it is parsed (no earlier response's total for the timer), and
 * the status line's last digit is cleared, so that a write shorter than a
 * status line leaves no earlier response's status there (dp_outlier.h). */
static __always_inline void dp_rb_reset(struct dp_rbuf *rb)
{
    rb->up = 0;
    rb->b[11] = 0;
}

/* dp_srv_verdict, first thing for each write of A (`first`: p->wait before it). */
static __always_inline void dp_close_response_msg(struct sk_msg_md *msg, __u64 up,
                                                  struct dp_peer_val *p, __u32 first)
{
    struct sk_msg_md *m = msg;
    asm volatile("" : "+r"(m)); /* else clang shares one msg+68 pointer between this
                                 * and the timer's load of msg->size: the verifier
                                 * refuses a load through a moved ctx pointer */
    __u32 size = m->size;
    if (!first) {
        dp_close_more(p, size, p->left == DP_LEFT_CHUNKED && dp_chunk_end_msg(msg, size));
        return;
    }
    __u32 zero = 0, n = size < DP_RESP_HEAD ? size : DP_RESP_HEAD;
    struct dp_rbuf *rb = dp_rscratch.lookup(&zero);
    if (rb)
        dp_rb_reset(rb);
    if (rb && n && !bpf_msg_pull_data(msg, 0, n, 0)) {
        void *d = msg->data, *e = msg->data_end;
        if (d + n <= e) {
            n = ((n - 1) & (DP_RESP_HEAD - 1)) + 1; /* 1..DP_RESP_HEAD, for the verifier */
            if (bpf_probe_read_kernel(rb->b, n, d))
                rb = 0;
        } else {
            rb = 0;
        }
    } else {
        rb = 0;
    }
    if (dp_close_parsed(up, p, rb, n, first, size) && dp_chunk_end_msg(msg, size))
        p->left = 0; /* the whole chunked body in this write */
}

/* dp_skb_verdict, first thing for each skb arriving on U. */
static __always_inline void dp_close_response_skb(struct __sk_buff *skb, __u64 up,
                                                  struct dp_peer_val *p, __u32 first)
{
    __u32 size = skb->len;
    if (!first) {
        dp_close_more(p, size, p->left == DP_LEFT_CHUNKED && dp_chunk_end_skb(skb, size));
        return;
    }
    __u32 zero = 0, n = size < DP_RESP_HEAD ? size : DP_RESP_HEAD;
    struct dp_rbuf *rb = dp_rscratch.lookup(&zero);
    if (rb)
        dp_rb_reset(rb);
    if (rb && n) {
        n = ((n - 1) & (DP_RESP_HEAD - 1)) + 1; /* 1..DP_RESP_HEAD, for the verifier */
        if (bpf_skb_load_bytes(skb, 0, rb->b, n))
            rb = 0;
    } else {
        rb = 0;
    }
    if (dp_close_parsed(up, p, rb, n, first, size) && dp_chunk_end_skb(skb, size))
        p->left = 0; /* the whole chunked body in this write */
}

/* "connection: close\r\n" after the reply's status line, which is 32 bytes
 * for a 429 ("HTTP/1.1 429 Too Many Requests\r\n", fastpath.synth.reply_bytes):
 * Envoy adds this header (as its last) to every reply before it closes. */
#define DP_CLOSE_AT 32
#define DP_CLOSE_HDR_LEN 19
static __always_inline void dp_close_header(struct sk_msg_md *msg)
{
    static const char hdr[DP_CLOSE_HDR_LEN + 1] = "connection: close\r\n";
    if (bpf_msg_pull_data(msg, DP_CLOSE_AT - 2, DP_CLOSE_AT, 0))
        return;
    __u8 *d = msg->data;
    if ((void *)(d + 2) > msg->data_end || d[0] != '\r' || d[1] != '\n')
        return; /* not the status line of a 429: no header rather than a wrong one */
    if (bpf_msg_push_data(msg, DP_CLOSE_AT, DP_CLOSE_HDR_LEN, 0) ||
        bpf_msg_pull_data(msg, DP_CLOSE_AT, DP_CLOSE_AT + DP_CLOSE_HDR_LEN, 0))
        return;
    d = msg->data;
    if ((void *)(d + DP_CLOSE_HDR_LEN) > msg->data_end)
        return;
#pragma unroll
    for (int i = 0; i < DP_CLOSE_HDR_LEN; i++)
        d[i] = hdr[i];
}

/* dp_msg_act, after the kernel's reply `ret` (dp_reply) to a request that
 * asked for the connection's close (dp_hop_act set DP_F_CLOSE_AFTER: only a
 * 429, the reply of a kernel-owned bucket; every other reply to
 * `Connection: close` goes to Envoy): Envoy adds `connection: close` and
 * closes the connection after its reply. The reply is in the client's receive
 * queue once this program returns; the agent gives the EOF after it. The
 * connection stays with Envoy until then (sticky): a request written after a
 * close must meet the close. A reply that failed went to Envoy (sticky
 * already), which closes by itself. */
static __always_inline int dp_close_after(struct sk_msg_md *msg, struct dp_conn *c, int ret)
{
    __u32 flags = c->flags;
    if (!(flags & DP_F_CLOSE_AFTER))
        return ret;
    c->flags = (flags & ~DP_F_CLOSE_AFTER) | DP_F_ENVOY;
    if (flags & DP_F_ENVOY)
        return ret;
    if (!(flags & DP_F_REST)) /* else apply_bytes covers the reply as it was */
        dp_close_header(msg);
    struct dp_event *e = dp_events.ringbuf_reserve(sizeof(struct dp_event));
    if (e) {
        __builtin_memset(e, 0, sizeof(*e));
        e->kind = DP_EV_CLOSE_REPLY;
        e->cookie = c->cookie;
        e->ts_ns = bpf_ktime_get_ns();
        dp_events.ringbuf_submit(e, 0);
    }
    return ret;
}

/* dp_skb_verdict with an empty skb (a FIN, tcp_read_skb hands it over empty):
 * an agent's EOF carrier passes it into its client's receive queue (the client
 * reads EOF after the bytes before it); any other upstream's FIN is dropped
 * (redirected, it broke the client's connection where Envoy keeps it: the
 * agent decides, fastpath/agent_reset.py and agent_close.py). */
static __always_inline int dp_close_eof(struct __sk_buff *skb)
{
    __u64 up = bpf_get_socket_cookie(skb);
    struct dp_peer_val *p = dp_peer.lookup(&up);
    if (!p || p->wait != DP_WAIT_EOF)
        return SK_DROP;
    __u64 ck = p->client;
    return dp_cli.sk_redirect_hash(skb, &ck, BPF_F_INGRESS);
}

#endif
