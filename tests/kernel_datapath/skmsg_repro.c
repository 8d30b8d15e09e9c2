/* Minimal sk_msg reproducer for the framing mechanisms of sk_msg.c (K2 framing).
 *
 * Owner: framing tests (tests/kernel_datapath/skmsg_repro.py loads it).
 * One client socket C (key 1 in rp_socks) writes; a second pair's client end
 * T (key 2) is the redirect target (its peer reads what T sends). Per write
 * the program looks at rp_cfg.mode and records (size, helper returns) in rp_log:
 *   1 CORK      size < cork_to: cork_bytes(cork_to), SK_PASS; else redirect to T
 *   2 POPALL    pop every byte of the write, then SK_PASS
 *   3 POPSELF   pop every byte, redirect into C's own ingress
 *   4 APPLY     apply_bytes(apply), redirect to T; the rest of the write: SK_PASS
 *   5 APPLYSELF apply_bytes(apply), redirect to T; the rest: redirect to C's egress
 *   7 CORKIN    as CORK, but the redirect goes into T's receive queue (paired mode)
 *   6 REPLYCUT  first write: rewrite into "R" * reply_len and redirect into C's
 *               ingress; later writes: pop all and SK_PASS
 */
#include <uapi/linux/bpf.h>

struct rp_cfg {
    __u32 mode;
    __u32 cork_to;
    __u32 apply;
    __u32 reply_len;
};

struct rp_rec {
    __u32 size;
    __s32 r1;
    __s32 r2;
    __u32 size_after;
};

BPF_SOCKHASH(rp_socks, __u64, 4);
BPF_ARRAY(rp_cfg_m, struct rp_cfg, 1);
BPF_ARRAY(rp_log, struct rp_rec, 64);
BPF_ARRAY(rp_n, __u32, 2); /* [0]: records, [1]: APPLY state (1: rest of a write) */

static __always_inline struct rp_rec *rp_next(void)
{
    __u32 z = 0;
    __u32 *n = rp_n.lookup(&z);
    if (!n)
        return 0;
    __u32 i = *n & 63;
    *n += 1;
    return rp_log.lookup(&i);
}

int rp_verdict(struct sk_msg_md *msg)
{
    __u32 z = 0, one = 1;
    struct rp_cfg *cfg = rp_cfg_m.lookup(&z);
    struct rp_rec *r = rp_next();
    __u32 *st = rp_n.lookup(&one);
    if (!cfg || !r || !st)
        return SK_PASS;
    __u64 self = 1, tgt = 2;
    __u32 size = msg->size;
    r->size = size;
    r->r1 = r->r2 = 0;
    if (cfg->mode == 1 || cfg->mode == 7) {
        if (size < cfg->cork_to) {
            r->r1 = bpf_msg_cork_bytes(msg, cfg->cork_to);
            r->size_after = msg->size;
            return SK_PASS;
        }
        r->r1 = rp_socks.msg_redirect_hash(msg, &tgt, cfg->mode == 7 ? BPF_F_INGRESS : 0);
        r->size_after = msg->size;
        return r->r1;
    }
    if (cfg->mode == 2 || cfg->mode == 3 || (cfg->mode == 6 && *st)) {
        r->r1 = bpf_msg_pop_data(msg, 0, size, 0);
        r->size_after = msg->size;
        if (cfg->mode == 3)
            return rp_socks.msg_redirect_hash(msg, &self, BPF_F_INGRESS);
        return SK_PASS;
    }
    if (cfg->mode == 6) {
        __u32 want = cfg->reply_len & 255;
        if (want > size)
            r->r1 = bpf_msg_push_data(msg, size, want - size, 0);
        else if (want < size)
            r->r1 = bpf_msg_pop_data(msg, want, size - want, 0);
        r->r2 = bpf_msg_pull_data(msg, 0, want, 0);
        char *d = msg->data;
        void *end = msg->data_end;
        for (__u32 i = 0; i < 255; i++) {
            if (i >= want || (void *)(d + i + 1) > end)
                break;
            d[i] = 'R';
        }
        r->size_after = msg->size;
        *st = 1;
        return rp_socks.msg_redirect_hash(msg, &self, BPF_F_INGRESS);
    }
    if (cfg->mode == 4 || cfg->mode == 5) {
        if (*st) {
            *st = 0;
            r->r1 = -1000;
            if (cfg->mode == 5)
                return rp_socks.msg_redirect_hash(msg, &self, 0);
            return SK_PASS;
        }
        if (size > cfg->apply) {
            bpf_msg_apply_bytes(msg, cfg->apply);
            *st = 1;
        }
        r->r1 = rp_socks.msg_redirect_hash(msg, &tgt, 0);
        r->size_after = msg->size;
        return r->r1;
    }
    return SK_PASS;
}
