/* Socket plumbing of the L7FP fast path: maps and structs shared by
 * sockops.c, sk_msg.c and sk_skb.c (one BCC module, built by fastpath/loader.py).
 *
 * Owner: kernel engineer K2 (data path and agent). The decision itself
 * (HTTP parsing, plan tables, l7fp_decide) lives in include/ (K1); this file
 * only holds per-connection state, upstream pools, counters and events.
 *
 * Python mirrors of these structs: fastpath/dp_structs.py (checked by
 * tests/kernel_datapath/test_layout.py).
 */
#ifndef L7FP_DATAPATH_H
#define L7FP_DATAPATH_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/tcp.h>

/* Every -D knob has a default so the file compiles on its own. */
#ifndef DP_MAX_CONNS
#define DP_MAX_CONNS 65536 /* client sockets tracked at once */
#endif
#ifndef DP_MAX_UP
#define DP_MAX_UP 4096 /* pooled upstream sockets */
#endif
#ifndef DP_MAX_POOLS
#define DP_MAX_POOLS 64 /* endpoints with a pool */
#endif
#ifndef DP_POOL_DEPTH
#define DP_POOL_DEPTH 256 /* free sockets per endpoint pool */
#endif
#ifndef DP_MAX_SVC
#define DP_MAX_SVC 256 /* meshed destinations (ip, port) */
#endif
#ifndef DP_REPLY_MAX
#define DP_REPLY_MAX 256 /* bytes of a kernel reply */
#endif
#ifndef DP_MAX_REPLIES
#define DP_MAX_REPLIES 64
#endif
#ifndef DP_BINDS
#define DP_BINDS 4 /* upstream sockets one client connection may hold */
#endif
#ifndef DP_CORK
#define DP_CORK 1 /* 1: cork a split head (bpf_msg_cork_bytes) and decide again on the next
                   * write; 0: a split head goes to Envoy. Verified on 6.18 with
                   * tests/kernel_datapath/skmsg_repro.py (cork, then redirect egress/ingress) */
#endif
#ifndef DP_HDR_MAX
#define DP_HDR_MAX 2048 /* bytes of a request head the kernel parses */
#endif

/* dp_conn.flags */
#define DP_F_ENVOY 1u   /* sticky: gone to Envoy, stays there */
#define DP_F_MESHED 2u  /* destination is a meshed service */
#define DP_F_REDIR_REST 4u /* rest of a write whose first part was redirected */
#define DP_F_SRV 8u     /* the app's accepted end of a pooled upstream (dp_srv) */
/* 16: DP_F_TMO (dp_timeout.h), 256: DP_F_RET (dp_return.h) */
#define DP_F_SWALLOW 1024u /* body_left bytes belong to a request the kernel answered: drop them */
#define DP_F_REST 2048u /* the next run is the rest of a write whose first request the
                         * kernel answered (apply_bytes): decide it as a new request */

/* Outcomes counted per route (dp_stat_key.outcome). */
#define DP_OUT_FAST 0   /* redirected to a pooled upstream */
#define DP_OUT_REPLY 1  /* answered by the kernel */
#define DP_OUT_ENVOY 2  /* handed to Envoy (reason says why) */
#define DP_OUT_CORK 3   /* head incomplete, waiting for more bytes */

/* Reasons a request goes to Envoy (dp_stat_key.reason), datapath-side.
 * Decision-side reasons (from l7fp_decide) are offset by DP_R_DECIDE_BASE. */
#define DP_R_NONE 0
#define DP_R_STICKY 1     /* connection already went to Envoy */
#define DP_R_POOL_EMPTY 2 /* no free upstream socket for the endpoint */
#define DP_R_NO_STATE 3   /* socket not tracked (no sk_storage) */
#define DP_R_REDIRECT 4   /* redirect failed (upstream gone) */
#define DP_R_BINDS 5      /* too many upstreams for one connection */
#define DP_R_REWRITE 6    /* reply rewrite failed */
#define DP_R_SPLIT 7      /* head split over writes and cork not possible */
#define DP_R_BODY 8       /* body continuation out of sync */
#define DP_R_NO_PLAN 9    /* no listener/plan for this destination */
#define DP_R_PIPELINE 10  /* pipelined requests that cannot all take the same way */
#define DP_R_HDR_ADD 11   /* the route adds request headers: Envoy does (not in the data path yet) */
#define DP_R_SWALLOW 16   /* the body of a kernel-answered request could not be dropped */
#define DP_R_CONN_CLOSE 18 /* Connection / Proxy-Connection: close: Envoy closes after it (dp_hop.h) */
#define DP_R_HOP 19        /* another hop-by-hop header form the kernel does not remove (dp_hop.h) */
#define DP_R_DECIDE_BASE 32

/* Events to the agent (ring buffer dp_events). */
#define DP_EV_CLOSE 1   /* client closed: its upstreams are released */
#define DP_EV_ACCESS 2  /* one request decided (kernel access log) */

/* What to do with the request at the head of a client write (dp_decide). */
#define DP_K_FORWARD 1
#define DP_K_REPLY 2
#define DP_K_NEED_MORE 3
#define DP_K_PASS 4

struct dp_verdict {
    __u32 kind;      /* DP_K_* */
    __u32 reason;    /* PASS: why */
    __u32 route;     /* route id for counters, 0: none */
    __u32 pool;      /* FORWARD: endpoint pool id */
    __u32 consumed;  /* head + Content-Length body */
    __u32 head_len;
    __u32 reply_id;  /* REPLY: index in dp_replies */
    __u32 status;    /* REPLY: status code */
    __u32 log;       /* set by sk_msg: access-log sampling (0 off, N: one in N) */
    __u32 cluster;   /* FORWARD: cluster id (for the access log) */
    __u32 hdr_add;   /* FORWARD: headers to insert before the blank line, 0: none */
    __u32 hdr_add_in; /* FORWARD: the destination's inbound headers, inserted after hdr_add */
    __u32 hop_n;     /* FORWARD: hop-by-hop header lines to remove (dp_hop.h), 0: none */
    __u32 hop_at[4]; /* their start | length << 16, in head order (DP_HOP_SLOTS) */
    __u32 hop_te;    /* dp_hop.h scan: TE lines seen */
    __u32 od_host;   /* FORWARD: outlier host slot + 1 (dp_outlier.h), 0: none */
    __u32 xrid;      /* FORWARD: DP_XRID_HAS_* the client sent (dp_xrid.h); the others are added */
    __u32 trace;     /* FORWARD: the listener's l7fp_listener.trace - 1 (dp_xrid.h), 0: none */
};

struct dp_bind {
    __u64 up_cookie; /* 0: free */
    __u32 pool;      /* endpoint pool id */
    __u32 _pad;
};

/* Per client socket, in sk_storage so it dies with the socket. */
struct dp_conn {
    __u64 cookie;       /* own socket cookie (key in dp_cli) */
    __u32 flags;
    __u32 listener;     /* listener id of the destination for the request being decided */
    __u32 body_left;    /* body bytes still to forward to body_up */
    __u32 body_bind;    /* index in binds[] of the body's upstream */
    __u32 reqs;         /* requests decided on this connection */
    __u32 gen;          /* plan generation seen at the last decision */
    __u32 dst_ip;       /* original destination (network order) */
    __u32 dst_port;     /* host order */
    __u32 src_ip;       /* the client's own address (network order): RBAC source CIDRs */
    __u32 _pad2;
    struct dp_bind binds[DP_BINDS];
};

struct dp_svc_key {
    __u32 ip;   /* network order */
    __u32 port; /* host order */
};

/* Listener id of a destination in each plan generation (0: none). sk_msg reads
 * it per request with the active generation, so a plan change that renumbers
 * listeners never applies one listener's routes to another's connection. */
struct dp_svc_val {
    __u32 lid[2];
};

/* A pooled upstream U the agent is connecting, keyed as the app's accepted
 * end A sees it (same netns): sock_ops pairs A with U's cookie. */
struct dp_pair_key {
    __u64 netns;    /* netns cookie */
    __u32 up_port;  /* U's local port = A's remote port (host order) */
    __u32 app_port; /* A's local port (host order) */
};

struct dp_stat_key {
    __u32 route;   /* route id from the decision, 0: before routing */
    __u16 outcome; /* DP_OUT_* */
    __u16 reason;  /* DP_R_* */
};

struct dp_reply {
    __u32 len;
    __u8 data[DP_REPLY_MAX];
};

struct dp_event {
    __u32 kind;     /* DP_EV_* */
    __u32 route;
    __u64 cookie;   /* client socket cookie */
    __u64 ts_ns;
    __u32 outcome;
    __u32 reason;
    __u32 status;   /* kernel reply status, 0 otherwise */
    __u32 bytes;    /* request bytes (head + body) */
    __u32 pool;     /* upstream pool for FAST */
    __u32 dst_ip;
    __u32 dst_port;
    __u32 _pad;
    __u64 up_cookies[DP_BINDS]; /* CLOSE: upstreams to release */
};

struct dp_gen_cfg {
    __u32 gen;      /* active plan generation (0/1), flipped last by the agent */
    __u32 enabled;  /* 0: everything to Envoy */
    __u32 access_log; /* N > 0: a dp_events entry for one decided request in N */
    __u32 timeouts; /* 1: some route of the active generation has a timeout (dp_rto) */
};

BPF_SOCKHASH(dp_cli, __u64, DP_MAX_CONNS);
BPF_SOCKHASH(dp_up, __u64, DP_MAX_UP);
BPF_SK_STORAGE(dp_conn_st, struct dp_conn);
/* dp_peer's value: the client bound to an upstream U, and whether a request
 * forwarded on U still waits for its first response byte (dp_reset.h). */
struct dp_peer_val {
    __u64 client; /* client socket cookie (dp_cli key) */
    __u32 wait;   /* 1 (| DP_WAIT_HEAD): set at FORWARD, cleared by the response path's first byte */
    __u32 left;   /* response bytes still to come after its first write (dp_close.h) */
    __u32 od_host; /* outlier host slot + 1 of the request forwarded on U, 0: none (dp_outlier.h) */
    __u32 _pad;
};
#define DP_WAIT_HEAD 2u             /* dp_peer_val.wait: the waiting request is a HEAD */
#define DP_WAIT_EOF 0x454f46u       /* dp_peer_val.wait of an agent's EOF carrier ("EOF") */
#define DP_LEFT_UNKNOWN 0xffffffffu /* dp_peer_val.left: framing not tracked */
#define DP_LEFT_CHUNKED 0xfffffffeu /* dp_peer_val.left: chunked, its last chunk not seen */

BPF_HASH(dp_peer, __u64, struct dp_peer_val, DP_MAX_UP); /* upstream cookie -> client */
/* Paired mode (merbridge-style): requests go straight into the app's accepted
 * socket A (ingress), its responses straight into the client's ingress; U only
 * made the pair. Keyed by U's cookie. */
BPF_SOCKHASH(dp_srv, __u64, DP_MAX_UP);
BPF_HASH(dp_pair_wait, struct dp_pair_key, __u64, DP_MAX_UP); /* -> U cookie */

BPF_QUEUE(dp_pool_tmpl, __u64, DP_POOL_DEPTH);
BPF_ARRAY_OF_MAPS(dp_free, "dp_pool_tmpl", DP_MAX_POOLS); /* pool id -> queue of free upstream cookies */
BPF_HASH(dp_svc, struct dp_svc_key, struct dp_svc_val, DP_MAX_SVC); /* destination -> listener ids */
BPF_PERCPU_HASH(dp_stats, struct dp_stat_key, __u64, 4096);
BPF_ARRAY(dp_replies, struct dp_reply, DP_MAX_REPLIES);
BPF_ARRAY(dp_cfg, struct dp_gen_cfg, 1);
BPF_RINGBUF_OUTPUT(dp_events, 64); /* 64 pages */
BPF_ARRAY(dp_pool_miss, __u64, DP_MAX_POOLS); /* pool found empty: the agent grows it */

static __always_inline void dp_count(__u32 route, __u16 outcome, __u16 reason)
{
    struct dp_stat_key k = {.route = route, .outcome = outcome, .reason = reason};
    __u64 one = 1, *v = dp_stats.lookup(&k);
    if (v)
        *v += 1; /* per-cpu: no atomics needed */
    else
        dp_stats.update(&k, &one);
}

#endif
