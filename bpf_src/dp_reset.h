/* An upstream app that closes (or dies) before answering: the kernel half.
 *
 * Owner: NAME=reset (K2 data path). Pasted after dp_timeout.h by fastpath/loader.py.
 * Envoy answers a request whose upstream connection closes (FIN or RST) before
 * any response byte with 503 "upstream connect error or disconnect/reset before
 * headers. reset reason: connection termination" and keeps the client's
 * connection. The fast path needs to know, when U's app end closes, whether a
 * request forwarded on U still waits for its first response byte. That bit
 * lives in dp_peer's value (U -> client), the map both response paths
 * (dp_srv_verdict, dp_skb_verdict) already look up per write: sk_msg sets it at
 * FORWARD (one lookup and a store, no map update), the response path clears it
 * with a store into the value it holds. The agent (fastpath/agent_reset.py)
 * reads it when U turns readable at EOF (paired: the app closed A, whose FIN
 * reaches U; unpaired: the app's FIN or RST on U): every response write of the
 * app ran its sk_msg before its close, and on U the data come before the FIN,
 * so the bit is final then.
 */
#ifndef L7FP_DP_RESET_H
#define L7FP_DP_RESET_H

/* sk_msg, at FORWARD on upstream `up` (the redirect takes effect after the
 * program returns, so before the app can answer); `od_host`: the outlier
 * host whose response this is (dp_outlier.h; a U serves several clusters). */
static __always_inline void dp_reset_wait(__u64 up, __u32 is_head, __u32 od_host)
{
    struct dp_peer_val *p = dp_peer.lookup(&up);
    if (p) {
        p->wait = 1 | (is_head ? DP_WAIT_HEAD : 0); /* HEAD: dp_close.h's framing */
#if DP_OUTLIER /* kept: dp_outlier.h comes after this header, and the store costs
               * the programs without outlier detection 80 processed insns */
        p->od_host = od_host;
#endif
    }
}

/* The response path, with the dp_peer value it looked up: a response byte
 * passes (to the client, or diverted to the retry agent, which then answers). */
static __always_inline void dp_reset_answered(struct dp_peer_val *p)
{
    if (p->wait)
        p->wait = 0;
}

#endif
