/* sock_ops on the mesh's pod cgroups: tracks client sockets.
 *
 * Owner: K2. Attached by fastpath/loader.py to each pod cgroup (and, in tests,
 * to a scoped sub-cgroup). For an active (client) connection whose original
 * destination (ip, port) is a meshed service in dp_svc, it creates the
 * connection's sk_storage state and puts the socket into dp_cli, where the
 * sk_msg program (sk_msg.c) sees every write. The socket's destination is the
 * pre-NAT service address: iptables REDIRECT rewrites packets, not the socket.
 * On close it releases the connection's upstream bindings and tells the agent,
 * which recycles those upstream sockets (fastpath/pools.py).
 */

static __always_inline __u32 dp_port_host(__u32 raw)
{
    /* remote_port is network order, in the upper or lower 16 bits
     * depending on the kernel: accept both. */
    __u16 p = raw > 0xffff ? (__u16)(raw >> 16) : (__u16)raw;
    return bpf_ntohs(p);
}

/* The socket's dp_conn (created when `flags` has BPF_SK_STORAGE_GET_F_CREATE);
 * 0 without a socket or state. */
static __always_inline struct dp_conn *dp_conn_of(struct bpf_sock_ops *skops, __u64 flags)
{
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 0;
    return dp_conn_st.sk_storage_get(sk, 0, flags);
}

/* A BPF_SOCK_OPS_STATE_CB into a state in which either side closes: the
 * connection is over for the fast path (clients and paired app ends alike). */
static __always_inline int dp_closing(struct bpf_sock_ops *skops)
{
    __u32 st = skops->args[1];
    return st == BPF_TCP_FIN_WAIT1 || st == BPF_TCP_CLOSE_WAIT || st == BPF_TCP_CLOSE ||
           st == BPF_TCP_LAST_ACK;
}

static __always_inline void dp_track(struct bpf_sock_ops *skops)
{
    struct dp_svc_key k = {.ip = skops->remote_ip4, .port = dp_port_host(skops->remote_port)};
    struct dp_svc_val *svc = dp_svc.lookup(&k);
    if (!svc)
        return; /* not a meshed destination: leave it alone */
    struct dp_conn *c = dp_conn_of(skops, BPF_SK_STORAGE_GET_F_CREATE);
    if (!c)
        return;
    __u64 cookie = bpf_get_socket_cookie(skops);
    c->cookie = cookie;
    c->listener = 0; /* looked up per request, for the active plan generation */
    c->flags = DP_F_MESHED;
    c->dst_ip = k.ip;
    c->dst_port = k.port;
    c->src_ip = skops->local_ip4;
    int err = dp_cli.sock_hash_update(skops, &cookie, BPF_NOEXIST);
    if (err != 0) {
        c->flags |= DP_F_ENVOY; /* map full: the connection stays with Envoy */
        return;
    }
    bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void dp_release(struct bpf_sock_ops *skops)
{
    struct dp_conn *c = dp_conn_of(skops, 0);
    if (!c)
        return;
    struct dp_event *e = dp_events.ringbuf_reserve(sizeof(struct dp_event));
    int any = 0;
#pragma unroll
    for (int i = 0; i < DP_BINDS; i++) {
        __u64 up = c->binds[i].up_cookie;
        if (e)
            e->up_cookies[i] = up;
        if (up) {
            any = 1;
            dp_lr_end(up); /* a request in flight on U ends with its client */
            dp_peer.delete(&up);
            c->binds[i].up_cookie = 0;
        }
    }
    c->flags |= DP_F_ENVOY; /* nothing more goes fast on a closing socket */
    dp_ret_forget(c);
    if (!e)
        return;
    if (!any) {
        dp_events.ringbuf_discard(e, 0);
        return;
    }
    e->kind = DP_EV_CLOSE;
    e->cookie = c->cookie;
    e->ts_ns = bpf_ktime_get_ns();
    e->route = 0;
    e->outcome = 0;
    e->reason = 0;
    e->status = 0;
    e->bytes = 0;
    e->pool = 0;
    e->dst_ip = c->dst_ip;
    e->dst_port = c->dst_port;
    e->_pad = 0;
    dp_events.ringbuf_submit(e, 0);
}

/* The app's end A of a pooled upstream connection the agent announced in
 * dp_pair_wait: put A into dp_srv under U's cookie (sk_msg.c then writes
 * requests straight into A, and A's responses go straight to the client). */
static __always_inline void dp_pair(struct bpf_sock_ops *skops)
{
    struct dp_pair_key k = {};
    k.netns = bpf_get_netns_cookie(skops);
    k.up_port = dp_port_host(skops->remote_port);
    k.app_port = skops->local_port;
    __u64 *up = dp_pair_wait.lookup(&k);
    if (!up)
        return; /* any other connection to the app: not ours */
    __u64 ucookie = *up;
    struct dp_conn *c = dp_conn_of(skops, BPF_SK_STORAGE_GET_F_CREATE);
    if (!c)
        return;
    c->cookie = ucookie;
    c->flags = DP_F_SRV;
    int err = dp_srv.sock_hash_update(skops, &ucookie, BPF_ANY);
    if (err == 0) {
        dp_pair_wait.delete(&k); /* tells the agent the pair is made */
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
    }
}

/* The app closes its end A: its upstream U goes too (out of dp_up), so sk_msg
 * never falls back to TCP towards a closed peer, where the request would be
 * lost; the next request of the bound client goes to Envoy instead. */
static __always_inline void dp_unpair(struct bpf_sock_ops *skops)
{
    struct dp_conn *a = dp_conn_of(skops, 0);
    if (!a || !(a->flags & DP_F_SRV))
        return;
    __u64 up = a->cookie;
    dp_up.delete(&up);
    a->flags &= ~DP_F_SRV;
}

/* sock_ops on the cgroups of pods the fast path sends to (destinations). */
int dp_sockops_srv(struct bpf_sock_ops *skops)
{
    if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        dp_pair(skops);
    } else if (skops->op == BPF_SOCK_OPS_STATE_CB && dp_closing(skops)) {
        dp_unpair(skops);
    }
    return 1;
}

int dp_sockops(struct bpf_sock_ops *skops)
{
    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        dp_track(skops);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (dp_closing(skops))
            dp_release(skops);
        break;
    default:
        break;
    }
    return 1;
}
