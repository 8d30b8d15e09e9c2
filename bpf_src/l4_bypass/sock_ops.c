/* sock_ops: put established pod-local socket pairs into l4b_socks.
 * Attached to each pod cgroup by benchmarks/l4bypass.py. See l4_bypass.h. */
#include "l4_bypass.h"

static __always_inline void l4b_add_active(struct bpf_sock_ops *skops)
{
    struct l4b_key key = {};
    key.netns = bpf_get_netns_cookie(skops);
    key.ip = skops->local_ip4;
    key.port = skops->local_port;
    key.role = L4B_ACTIVE;
    /* a live active socket with the same local endpoint: the endpoint no
     * longer names one connection, mark it so sk_msg never redirects it */
    /* BCC rewrites map calls only as whole statements: keep them out of conditions */
    int rc = l4b_socks.sock_hash_update(skops, &key, BPF_NOEXIST);
    if (rc != 0) {
        __u32 one = 1;
        l4b_ambiguous.update(&key, &one);
        l4b_count(L4B_STAT_AMBIGUOUS);
        return;
    }
    l4b_count(L4B_STAT_SOCK_ADD);
}

static __always_inline void l4b_add_passive(struct bpf_sock_ops *skops)
{
    /* only connections that stay inside the pod: to loopback, or to our own
     * address (REDIRECT of a locally generated packet lands on 127.0.0.1) */
    if (!l4b_is_loopback(skops->local_ip4) && skops->local_ip4 != skops->remote_ip4)
        return;
    struct l4b_key key = {};
    key.netns = bpf_get_netns_cookie(skops);
    key.ip = skops->remote_ip4;
    key.port = bpf_ntohl(skops->remote_port);
    key.role = L4B_PASSIVE;
    int rc = l4b_socks.sock_hash_update(skops, &key, BPF_ANY);
    if (rc == 0)
        l4b_count(L4B_STAT_SOCK_ADD);
}

int l4b_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET)
        return 1;
    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        l4b_add_active(skops);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        l4b_add_passive(skops);
        break;
    default:
        break;
    }
    return 1;
}
