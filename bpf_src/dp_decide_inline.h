/* Built-in decision of the data path (K2), used until the plan's l7fp_decide
 * (include/, K1) is compiled in, and by the plumbing tests.
 *
 * Deliberately small: "GET /path HTTP/1.1" with its head (ending CRLFCRLF) in
 * the first DP_IHDR_MAX bytes of the write and no body ("content-*" or
 * "transfer-*" headers send it to Envoy); exactly one Host header.
 * Listener: from dp_svc (the connection's original destination). Virtual host:
 * by exact Host (FNV-1a of the lower-cased value, tried with and then without
 * its ":port"), else the listener's "*" entry, else Envoy. Routes: first path
 * prefix match among the virtual host's entries. The head is copied into a
 * per-CPU scratch and read with masked indices; scanner state lives in the
 * scratch, so the verifier sees one small state per loop round.
 */
#ifndef L7FP_DP_DECIDE_INLINE_H
#define L7FP_DP_DECIDE_INLINE_H

#ifndef DP_IROUTES
#define DP_IROUTES 8 /* routes looked at per virtual host */
#endif
#ifndef DP_IROUTE_TOTAL
#define DP_IROUTE_TOTAL 64 /* route entries per generation */
#endif
#define DP_IPREFIX 32
#define DP_IPOOLS 4 /* endpoints per route (random choice, like Envoy's RANDOM) */
#ifndef DP_IHDR_MAX
#define DP_IHDR_MAX 512 /* power of two */
#endif
#define DP_IMASK (DP_IHDR_MAX - 1)
#define DP_IHOST_MAX 64

struct dp_iroute {
    __u32 used;
    __u32 kind;      /* DP_K_FORWARD / DP_K_REPLY / DP_K_PASS (punt) */
    __u32 npools;    /* FORWARD: endpoints in pools[] */
    __u32 reply_id;  /* REPLY: index in dp_replies */
    __u32 status;    /* REPLY: status, for counters and the access log */
    __u32 plen;
    __u32 route_id;  /* for counters (agent's numbering, >0) */
    __u32 pools[DP_IPOOLS];
    char prefix[DP_IPREFIX];
};

struct dp_ihost_key {
    __u32 gen;
    __u32 listener;
    __u64 hash; /* FNV-1a of the lower-cased host; 0 with len 0: the "*" entry */
    __u32 len;
    __u32 pad;
};

struct dp_ivhost {
    __u32 base; /* first route entry (within the generation) */
    __u32 n;    /* route entries */
};

struct dp_iscratch {
    __u32 n;      /* bytes copied */
    __u32 head;   /* head length once CRLFCRLF is seen */
    __u32 bad;    /* PASS reason seen while scanning */
    __u32 hoff;   /* offset of the Host value (after "host:") */
    __u32 nhost;  /* Host headers seen */
    __u32 hlen, plen2, done; /* host length, length before ':', end seen */
    __u64 h, hnoport;
    __u8 b[DP_IHDR_MAX + DP_IPREFIX + DP_IHOST_MAX];
};

/* index = gen * DP_IROUTE_TOTAL + i: two generations, the agent flips dp_cfg.gen last */
BPF_ARRAY(dp_iroutes, struct dp_iroute, 2 * DP_IROUTE_TOTAL);
BPF_HASH(dp_ihosts, struct dp_ihost_key, struct dp_ivhost, 2048);
BPF_PERCPU_ARRAY(dp_iscr, struct dp_iscratch, 1);

#define DP_IR_UNPARSED (DP_R_DECIDE_BASE + 1)
#define DP_IR_BODY (DP_R_DECIDE_BASE + 2)
#define DP_IR_PUNT (DP_R_DECIDE_BASE + 7)
#define DP_IR_NO_LISTENER (DP_R_DECIDE_BASE + 11)
#define DP_IR_NO_VHOST (DP_R_DECIDE_BASE + 12)
#define DP_IR_NO_ROUTE (DP_R_DECIDE_BASE + 13)
#define DP_IR_NO_HOST (DP_R_DECIDE_BASE + 14)

#define DP_FNV_OFF 0xcbf29ce484222325ULL
#define DP_FNV_PRIME 0x100000001b3ULL

/* Bytes and length of kernel reply `id` (sk_msg.c rewrites the request into it). */
static __always_inline __u8 *dp_reply_get(__u32 gen, __u32 id, __u32 *len)
{
    struct dp_reply *r = dp_replies.lookup(&id);
    if (!r)
        return 0;
    *len = r->len;
    return r->data;
}

/* The built-in decision never adds headers. */
static __always_inline __u8 *dp_hdr_add_get(__u32 gen, __u32 hdr_add, __u32 *len)
{
    return 0;
}

static __always_inline int dp_ipass(struct dp_verdict *v, __u32 why)
{
    v->kind = DP_K_PASS;
    v->reason = why;
    return 0;
}

/* Hash the Host value at s->hoff: lower case, leading spaces skipped, up to CR
 * or space. Also the hash of the part before ':' (host without port). */
static __always_inline void dp_ihash_host(struct dp_iscratch *s)
{
    s->h = DP_FNV_OFF;
    s->hnoport = 0;
    s->hlen = 0;
    s->plen2 = 0;
    s->done = 0;
    for (__u32 j = 0; j < DP_IHOST_MAX + 8; j++) {
        asm volatile("" ::: "memory");
        if (s->done)
            break;
        __u8 ch = s->b[(s->hoff + j) & DP_IMASK];
        if (ch == ' ' && s->hlen == 0)
            continue;
        if (ch == '\r' || ch == ' ' || ch == '\t') {
            s->done = 1;
            break;
        }
        if (ch == ':' && !s->plen2) {
            s->hnoport = s->h;
            s->plen2 = s->hlen;
        }
        if (ch >= 'A' && ch <= 'Z')
            ch += 32;
        s->h = (s->h ^ ch) * DP_FNV_PRIME;
        s->hlen += 1;
    }
    if (!s->done || s->hlen == 0 || s->hlen > DP_IHOST_MAX)
        s->bad = DP_IR_NO_HOST;
}

static __always_inline struct dp_ivhost *dp_ivhost_find(__u32 gen, __u32 listener,
                                                       struct dp_iscratch *s)
{
    struct dp_ihost_key k = {.gen = gen & 1, .listener = listener, .hash = s->h,
                             .len = s->hlen};
    struct dp_ivhost *vh = dp_ihosts.lookup(&k);
    if (vh)
        return vh;
    if (s->plen2) {
        k.hash = s->hnoport;
        k.len = s->plen2;
        vh = dp_ihosts.lookup(&k);
        if (vh)
            return vh;
    }
    k.hash = 0;
    k.len = 0;
    return dp_ihosts.lookup(&k);
}

/* Not a GET: Envoy's. A complete bodiless HEAD head says how long it is
 * (consumed), so Envoy's response to it can be followed (dp_return.h). */
static __always_inline int dp_ipass_head(struct dp_verdict *v, struct dp_iscratch *s)
{
    if (s->head && s->b[0] == 'H' && s->b[1] == 'E' && s->b[2] == 'A' && s->b[3] == 'D' &&
        s->b[4] == ' ' && s->b[5] == '/')
        v->consumed = s->head;
    return dp_ipass(v, DP_IR_UNPARSED);
}

/* 1 when the header line after the '\n' at i is Keep-Alive, Proxy-* or TE
 * (a, b: its first two bytes, lower case). Connection is caught with the body
 * headers ("co"). The l7fp decision removes some of them as Envoy does
 * (dp_hop.h); this one hands them all to Envoy. */
static __always_inline int dp_ihop(struct dp_iscratch *s, __u32 i, __u8 a, __u8 b)
{
    __u8 c3 = s->b[(i + 3) & DP_IMASK] | 0x20, c4 = s->b[(i + 4) & DP_IMASK] | 0x20;
    return (a == 'k' && b == 'e' && c3 == 'e' && c4 == 'p') ||
           (a == 'p' && b == 'r' && c3 == 'o' && c4 == 'x') ||
           (a == 't' && b == 'e' && s->b[(i + 3) & DP_IMASK] == ':');
}

static __always_inline int dp_decide(struct dp_conn *c, __u32 gen, void *data, void *data_end,
                                     struct dp_verdict *v)
{
    __u32 zero = 0;
    struct dp_iscratch *s = dp_iscr.lookup(&zero);
    if (!s)
        return dp_ipass(v, DP_IR_UNPARSED);
    __u8 *p = data;
    s->n = 0;
    s->head = 0;
    s->bad = 0;
    s->hoff = 0;
    s->nhost = 0;
    for (__u32 i = 0; i < DP_IHDR_MAX; i++) {
        if ((void *)(p + i + 1) > data_end)
            break;
        s->b[i & DP_IMASK] = p[i];
        s->n = i + 1;
    }
    for (__u32 i = 4; i < DP_IHDR_MAX - 3; i++) {
        asm volatile("" ::: "memory");
        if (i + 4 > s->n || s->head || s->bad)
            break;
        __u8 ch = s->b[i & DP_IMASK];
        if (ch == '\n') {
            __u8 a = s->b[(i + 1) & DP_IMASK] | 0x20, b = s->b[(i + 2) & DP_IMASK] | 0x20;
            if ((a == 'c' && b == 'o') || (a == 't' && b == 'r'))
                s->bad = DP_IR_BODY; /* a body header (or Connection): not for the inline path */
            if (dp_ihop(s, i, a, b))
                s->bad = DP_R_HOP; /* hop-by-hop: this decision does not remove them (dp_hop.h) */
            if (a == 'h' && b == 'o' && (s->b[(i + 3) & DP_IMASK] | 0x20) == 's' &&
                (s->b[(i + 4) & DP_IMASK] | 0x20) == 't' && s->b[(i + 5) & DP_IMASK] == ':') {
                s->nhost += 1;
                s->hoff = i + 6;
            }
        } else if (ch == '\r' && s->b[(i + 1) & DP_IMASK] == '\n' &&
                   s->b[(i + 2) & DP_IMASK] == '\r' && s->b[(i + 3) & DP_IMASK] == '\n') {
            s->head = i + 4;
        }
    }
    asm volatile("" ::: "memory");
    __u32 n = s->n, head = s->head;
    if (s->bad)
        return dp_ipass(v, s->bad);
    if (n < 18) {
        v->kind = DP_K_NEED_MORE;
        v->reason = DP_IR_UNPARSED;
        return 0;
    }
    if (s->b[0] != 'G' || s->b[1] != 'E' || s->b[2] != 'T' || s->b[3] != ' ' || s->b[4] != '/')
        return dp_ipass_head(v, s);
    if (!head) {
        v->kind = n >= DP_IHDR_MAX ? DP_K_PASS : DP_K_NEED_MORE;
        v->reason = DP_IR_UNPARSED;
        return 0;
    }
    v->consumed = head;
    v->head_len = head;
    if (s->nhost != 1)
        return dp_ipass(v, DP_IR_NO_HOST);
    dp_ihash_host(s);
    if (s->bad)
        return dp_ipass(v, s->bad);
    if (!c->listener)
        return dp_ipass(v, DP_IR_NO_LISTENER);
    struct dp_ivhost *vh = dp_ivhost_find(gen, c->listener, s);
    if (!vh)
        return dp_ipass(v, DP_IR_NO_VHOST);
    __u32 base = vh->base, nr = vh->n;
    for (__u32 r = 0; r < DP_IROUTES; r++) {
        if (r >= nr)
            break;
        __u32 idx = (gen & 1) * DP_IROUTE_TOTAL + ((base + r) & (DP_IROUTE_TOTAL - 1));
        struct dp_iroute *rt = dp_iroutes.lookup(&idx);
        if (!rt || !rt->used)
            break;
        int ok = 1;
        for (__u32 q = 0; q < DP_IPREFIX; q++) {
            if (q >= rt->plen)
                break;
            if (s->b[4 + q] != rt->prefix[q]) {
                ok = 0;
                break;
            }
        }
        if (!ok)
            continue;
        v->route = rt->route_id;
        v->kind = rt->kind;
        v->reply_id = rt->reply_id;
        v->status = rt->status;
        v->reason = rt->kind == DP_K_PASS ? DP_IR_PUNT : 0;
        if (rt->kind == DP_K_FORWARD) {
            __u32 np = rt->npools;
            if (np == 0 || np > DP_IPOOLS)
                return dp_ipass(v, DP_IR_PUNT);
            __u64 pick = np == 1 ? 0 : bpf_get_prandom_u32() % np;
            asm volatile("" : "+r"(pick)); /* the mask below must stay: the verifier needs it */
            pick &= DP_IPOOLS - 1;
            v->pool = rt->pools[pick];
        }
        return 0;
    }
    return dp_ipass(v, DP_IR_NO_ROUTE);
}

/* LEAST_REQUEST's in-flight counts are the plan decision's (dp_decide_l7fp.h):
 * the built-in decision picks no LEAST_REQUEST endpoint. */
static __always_inline void dp_lr_end(__u64 up) {}
static __always_inline void dp_lr_sent(__u64 up) {}
static __always_inline void dp_lr_response(__u64 up, struct dp_peer_val *p) {}

#endif
