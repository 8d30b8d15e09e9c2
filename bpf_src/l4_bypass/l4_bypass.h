/* L4 sockmap bypass of the app<->sidecar hops (the merbridge / istio-tcpip-bypass
 * idea), used by the benchmark's `sidecar-l4` configuration.
 *
 * Owner: benchmarks (benchmarks/l4bypass.py loads it with BCC and attaches
 * sock_ops.c to the pod cgroups, sk_msg.c to the l4b_socks SOCKHASH).
 *
 * Pairing without NAT knowledge: iptables REDIRECT rewrites the destination
 * but never the source, so in a pod the two sockets of one local connection
 * agree on the *active* side's local endpoint. The active socket is keyed by
 * its own local endpoint (role L4B_ACTIVE); a pod-local passive socket by its
 * remote endpoint (role L4B_PASSIVE). A sender looks up the other role with
 * the same endpoint and redirects into that socket's receive queue. The netns
 * cookie keeps pods (each with its own 127.0.0.1) apart.
 */
#ifndef L4_BYPASS_H
#define L4_BYPASS_H

#include <uapi/linux/bpf.h>
#include <linux/socket.h>

#ifndef L4B_MAX_SOCKS
#define L4B_MAX_SOCKS 65536
#endif

#define L4B_ACTIVE 1
#define L4B_PASSIVE 2

/* counters, index into l4b_stats */
#define L4B_STAT_REDIRECT 0   /* messages delivered straight to the peer socket */
#define L4B_STAT_PASS 1       /* messages left on the TCP path (no local peer) */
#define L4B_STAT_SOCK_ADD 2   /* sockets inserted into l4b_socks */
#define L4B_STAT_AMBIGUOUS 3  /* active endpoints seen twice (port reuse): never redirected */
#define L4B_STAT_MAX 4

struct l4b_key {
    __u64 netns;  /* bpf_get_netns_cookie() of the socket */
    __u32 ip;     /* IPv4 address, network order */
    __u32 port;   /* port, host order */
    __u32 role;   /* L4B_ACTIVE or L4B_PASSIVE */
    __u32 pad;
};

BPF_SOCKHASH(l4b_socks, struct l4b_key, L4B_MAX_SOCKS);
/* endpoints used by two active sockets at once (ephemeral port reused for
 * another destination): the pairing above is ambiguous there, so pass. */
BPF_TABLE("lru_hash", struct l4b_key, __u32, l4b_ambiguous, 4096);
BPF_PERCPU_ARRAY(l4b_stats, __u64, L4B_STAT_MAX);

static __always_inline void l4b_count(int idx)
{
    __u64 *v = l4b_stats.lookup(&idx);
    if (v)
        *v += 1;
}

/* 127.0.0.0/8, with the address in network order */
static __always_inline int l4b_is_loopback(__u32 ip)
{
    return (ip & 0xff) == 127;
}

#endif /* L4_BYPASS_H */
