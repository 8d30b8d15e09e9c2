/* BPF_PROG_TEST_RUN harness of l7fp_decide (sched_cls: a program type that
 * supports test runs; sk_msg does not).
 *
 * Owned by the decision engine (K1); used only by tests/kernel_decide. The test
 * packet is a 14-byte dummy Ethernet header followed by the request bytes. The
 * inputs l7fp_decide takes from its caller (random draws, clock, generation,
 * listener) come from td_in[0]; the decision is written to td_out[0].
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "l7fp_decide.h"

struct td_in {
    __u32 rand;
    __u32 rand2;
    __u32 gen;
    __u32 listener;
    __u64 now_ns;
    __u32 src_ip4;
    __u32 pad;
    __u32 rand3;
    __u32 pad2;
};

BPF_ARRAY(td_in, struct td_in, 1);
BPF_ARRAY(td_out, struct l7fp_decision, 1);

int td_decide(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct td_in *in = td_in.lookup(&zero);
    struct l7fp_req_ctx *c = l7fp_ctx_get();
    struct l7fp_decision *out = td_out.lookup(&zero);
    if (!in || !c || !out)
        return TC_ACT_SHOT;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    if (data + 14 > data_end)
        return TC_ACT_SHOT;
    c->rand = in->rand;
    c->rand2 = in->rand2;
    c->rand3 = in->rand3;
    c->gen = in->gen;
    c->now_ns = in->now_ns;
    c->src_ip4 = in->src_ip4;
#ifdef L7FP_TD_PARSE_ONLY /* verifier-cost probe of the parser alone */
    __u32 why = 0;
    out->verdict = l7fp_parse(c, data + 14, data_end, 0, &why);
    out->reason = why;
    return 0;
#elif defined(L7FP_TD_AGAIN) /* the data path's second (inbound) decision, listener pad - 1 */
    int v = l7fp_decide(c, data + 14, data_end, in->listener, out);
    if (!in->pad || v != L7FP_FORWARD)
        return v;
    struct l7fp_decision first = *out;
    return l7fp_decide_again(c, in->pad - 1, &first, out);
#else
    return l7fp_decide(c, data + 14, data_end, in->listener, out);
#endif
}
