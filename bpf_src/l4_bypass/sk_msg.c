/* sk_msg: deliver a pod-local send straight into the peer socket's receive
 * queue, skipping TCP/IP, loopback and netfilter. Attached to l4b_socks by
 * benchmarks/l4bypass.py. Anything without a unique local peer: SK_PASS. */
#include "l4_bypass.h"

int l4b_skmsg(struct sk_msg_md *msg)
{
    if (msg->family != AF_INET)
        return SK_PASS;
    struct l4b_key key = {};
    key.netns = bpf_get_netns_cookie(msg);

    /* as the active side: the peer is the passive socket keyed by our local endpoint */
    key.ip = msg->local_ip4;
    key.port = msg->local_port;
    key.role = L4B_ACTIVE;
    int rc;
    if (!l4b_ambiguous.lookup(&key)) {
        key.role = L4B_PASSIVE;
        /* BCC rewrites map calls only as whole statements */
        rc = l4b_socks.msg_redirect_hash(msg, &key, BPF_F_INGRESS);
        if (rc == SK_PASS) {
            l4b_count(L4B_STAT_REDIRECT);
            return SK_PASS;
        }
    }
    /* as the passive side: the peer is the active socket keyed by our remote endpoint */
    key.ip = msg->remote_ip4;
    key.port = bpf_ntohl(msg->remote_port);
    key.role = L4B_ACTIVE;
    if (!l4b_ambiguous.lookup(&key)
        && (l4b_is_loopback(msg->local_ip4) || msg->local_ip4 == msg->remote_ip4)) {
        rc = l4b_socks.msg_redirect_hash(msg, &key, BPF_F_INGRESS);
        if (rc == SK_PASS) {
            l4b_count(L4B_STAT_REDIRECT);
            return SK_PASS;
        }
    }
    l4b_count(L4B_STAT_PASS);
    return SK_PASS;
}
