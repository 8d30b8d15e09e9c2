/* sk_skb reproducer for a gateway's receive-side data path (NAME=gwkernel).
 *
 * Owner: tests/kernel_datapath/skskb_gateway_repro.py loads it; nothing in the
 * product uses it. At an ingress gateway the request arrives from the network
 * on the gateway's *accepted* socket A, so the kernel path must act on receive
 * (sk_skb), not on send (sk_msg).
 *
 *   gk_sockops   sock_ops on a scoped cgroup: the passive side of a connection
 *                accepted on gk_cfg.gw_port goes into gk_strp (stream parser +
 *                stream verdict) or gk_raw (SK_SKB_VERDICT alone), keyed by the
 *                client's port (host order); every established callback is logged
 *   gk_parser    SK_SKB_STREAM_PARSER: the length of one HTTP/1.1 request (head
 *                up to CRLFCRLF + Content-Length), 0 while it is incomplete
 *   gk_verdict   the verdict of both maps: per gk_cfg.mode PASS / forward to the
 *                upstream U's egress / into the server socket S's receive queue /
 *                insert an x-forwarded-for line then forward / rewrite into a reply
 *                to A's own egress; the first gk_cfg.pass_first messages PASS
 *   gk_up_verdict SK_SKB_VERDICT on gk_up (U): the response goes out of A (egress)
 *
 * Every run is logged in gk_log (kind, skb->len, returns, first GK_SNAP bytes as
 * bpf_skb_load_bytes(skb, 0, ...) reads them).
 */
#include <uapi/linux/bpf.h>

#define GK_SNAP 64
#define GK_HEAD 256 /* bytes of a request head the parser and the rewrite read */
#define GK_CHUNK 64
#define GK_MOVE_CHUNKS 16 /* a rewrite moves at most 16 * 64 bytes behind the head */

#define GK_K_SOCKOPS 1
#define GK_K_PARSER 2
#define GK_K_VERDICT 3
#define GK_K_UP 4

#define GK_PASS 0
#define GK_FWD 1
#define GK_FWD_INGRESS 2
#define GK_XFF 3
#define GK_REPLY 4

#define GK_UP_KEY 1  /* U in gk_up */
#define GK_SRV_KEY 2 /* S (the server's accepted socket) in gk_up */

struct gk_cfg {
    __u32 gw_port;     /* the gateway listener's port (host order) */
    __u32 raw;         /* 1: accepted sockets go into gk_raw, else gk_strp */
    __u32 mode;        /* what the verdict does (GK_*) */
    __u32 pass_first;  /* this many messages PASS before mode applies */
    __u64 client_key;  /* gk_up's responses go out of this accepted socket */
};

struct gk_rec {
    __u32 kind;
    __u32 len;    /* skb->len (sock_ops: op) */
    __s32 ret;    /* the program's return (parser: the length) */
    __s32 r1;     /* helper returns (see the .py) */
    __s32 r2;
    __u32 lport;
    __u32 rport;
    __u32 snap_len;
    char snap[GK_SNAP];
};

struct gk_buf {
    __u32 end; /* gk_head's results (see there) */
    __u32 at;
    __u32 hl;  /* the x-forwarded-for line's length */
    __u32 pad;
    char b[GK_HEAD];
    char tmp[GK_CHUNK];
    char line[64];
};

BPF_SOCKHASH(gk_strp, __u64, 16);
BPF_SOCKHASH(gk_raw, __u64, 16);
BPF_SOCKHASH(gk_up, __u64, 4);
BPF_ARRAY(gk_cfg_m, struct gk_cfg, 1);
BPF_ARRAY(gk_log, struct gk_rec, 256);
BPF_ARRAY(gk_n, __u32, 2); /* [0]: records written, [1]: messages seen by the verdict */
BPF_PERCPU_ARRAY(gk_scratch, struct gk_buf, 1);

static __always_inline struct gk_rec *gk_next(__u32 kind)
{
    __u32 z = 0;
    __u32 *n = gk_n.lookup(&z);
    if (!n)
        return 0;
    __u32 i = *n & 255; /* not atomic: the scenarios send one piece at a time */
    *n += 1;
    struct gk_rec *r = gk_log.lookup(&i);
    if (r) {
        r->kind = kind;
        r->ret = r->r1 = r->r2 = 0;
    }
    return r;
}

static __always_inline void gk_snap(struct __sk_buff *skb, struct gk_rec *r)
{
    __u32 n = skb->len;
    if (n > GK_SNAP)
        n = GK_SNAP;
    r->snap_len = n;
    r->len = skb->len;
    r->lport = skb->local_port;
    r->rport = bpf_ntohl(skb->remote_port);
    if (n >= 1 && n <= GK_SNAP)
        bpf_skb_load_bytes(skb, 0, r->snap, n);
}

/* The client's port in host order, from sock_ops' or __sk_buff's remote_port. */
static __always_inline __u64 gk_port(__u32 raw)
{
    __u16 p = raw > 0xffff ? (__u16)(raw >> 16) : (__u16)raw;
    return bpf_ntohs(p);
}

int gk_sockops(struct bpf_sock_ops *skops)
{
    __u32 z = 0;
    struct gk_cfg *cfg = gk_cfg_m.lookup(&z);
    if (!cfg)
        return 1;
    __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    struct gk_rec *r = gk_next(GK_K_SOCKOPS);
    __u64 key = gk_port(skops->remote_port);
    int ret = -1; /* not added */
    if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && skops->local_port == cfg->gw_port) {
        if (cfg->raw) {
            ret = gk_raw.sock_hash_update(skops, &key, BPF_ANY);
        } else {
            ret = gk_strp.sock_hash_update(skops, &key, BPF_ANY);
        }
    }
    if (r) {
        r->len = op;
        r->ret = ret;
        r->lport = skops->local_port;
        r->rport = key;
        r->snap_len = 0;
    }
    return 1;
}

static __always_inline int gk_lower(char c)
{
    return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

/* In sb->b[0..n): the offset just past the head's CRLFCRLF (0: none), and in
 * *clen the Content-Length value (0 without one). Loops of one branch each, and
 * the positions found go through the map value (sb->end, sb->at): kept in
 * registers, each position would be a constant the verifier walks the rest of
 * the program with, once per position (E2BIG). */
static __always_inline __u32 gk_head(struct gk_buf *sb, __u32 n, __u32 *clen)
{
    const char *b = sb->b;
#define GK_B(x) b[(x) & (GK_HEAD - 1)] /* every index masked: in bounds for the verifier */
#define GK_W(x) (*(const __u64 *)(b + ((x) & (GK_HEAD - 1))) | 0x2020202020202020ULL)
    sb->end = 0;
    sb->at = 0;
    *clen = 0;
    for (__u32 i = 3; i < GK_HEAD; i++) {
        if (i >= n)
            break;
        if (GK_B(i - 3) == '\r' && GK_B(i - 2) == '\n' && GK_B(i - 1) == '\r' && GK_B(i) == '\n') {
            sb->end = i + 1;
            break;
        }
    }
    __u32 end = *(volatile __u32 *)&sb->end; /* reloaded: unknown to the verifier */
    /* "\ncontent-length:" in any case: two 8-byte words ORed with 0x20 */
    for (__u32 i = 1; i + 16 < GK_HEAD; i++) {
        if (i + 16 > end)
            break;
        if (GK_B(i - 1) == '\n' && GK_W(i) == 0x2d746e65746e6f63ULL /* "content-" */ &&
            GK_W(i + 7) == 0x3a6874676e656c2dULL /* "-length:" */) {
            sb->at = i + 15;
            break;
        }
    }
    __u32 at = *(volatile __u32 *)&sb->at;
    if (!at)
        return end;
    __u32 v = 0;
    for (__u32 k = 0; k < 8; k++) {
        char c = GK_B(at + k);
        if (c == ' ')
            c = '0'; /* optional white space before the digits: a leading 0 */
        if (c < '0' || c > '9')
            break;
        v = (v * 10 + (c - '0')) & 0xffffff; /* one range on every path */
    }
    *clen = v;
#undef GK_B
#undef GK_W
    return end;
}

/* Loads min(skb->len, GK_HEAD) bytes into b; returns how many. */
static __always_inline __u32 gk_load_head(struct __sk_buff *skb, char *b)
{
    __u32 n = skb->len;
    if (n > GK_HEAD)
        n = GK_HEAD;
    if (n < 1)
        return 0;
    if (bpf_skb_load_bytes(skb, 0, b, n & (2 * GK_HEAD - 1)) < 0)
        return 0;
    return n;
}

int gk_parser(struct __sk_buff *skb)
{
    __u32 z = 0;
    struct gk_buf *sb = gk_scratch.lookup(&z);
    struct gk_rec *r = gk_next(GK_K_PARSER);
    if (!sb)
        return skb->len;
    __u32 clen = 0;
    __u32 n = gk_load_head(skb, sb->b);
    __u32 end = gk_head(sb, n, &clen);
    int ret = 0; /* incomplete: strparser waits for more bytes */
    if (end)
        ret = end + clen;
    else if (skb->len >= GK_HEAD)
        ret = skb->len; /* no head end within the limit: the whole buffer, the verdict passes it */
    if (r) {
        gk_snap(skb, r);
        r->ret = ret;
        r->r1 = end;
        r->r2 = clen;
    }
    return ret;
}

/* Writes "x-forwarded-for: a.b.c.d\r\n" for the big-endian address `ip` into
 * line; returns its length. */
static __always_inline __u32 gk_xff_line(char *line, __u32 ip)
{
    const char pre[] = "x-forwarded-for: ";
    __u32 n = 0;
#pragma unroll
    for (int k = 0; k < 17; k++)
        line[k] = pre[k];
    n = 17;
#pragma unroll
    for (int o = 0; o < 4; o++) {
        __u32 v = (ip >> (8 * o)) & 0xff; /* network order: first octet lowest */
        if (v >= 100)
            line[n++ & 63] = '0' + v / 100;
        if (v >= 10)
            line[n++ & 63] = '0' + (v / 10) % 10;
        line[n++ & 63] = '0' + v % 10;
        if (o < 3)
            line[n++ & 63] = '.';
    }
    line[n++ & 63] = '\r';
    line[n++ & 63] = '\n';
    return n; /* one constant per digit count (81): the caller launders it through the map */
}

/* Inserts line[0..hl) at offset `at` (before the blank line): grows the tail,
 * moves [at, len) back by hl, 64 bytes at a time from the end, stores the line.
 * Returns 0, or the failing step (negative). */
static __always_inline int gk_insert(struct __sk_buff *skb, struct gk_buf *sb, __u32 at, __u32 hl,
                                     struct gk_rec *r)
{
    __u32 len = skb->len;
    if (at > len || hl < 1 || hl > 48)
        return -100;
    int e = bpf_skb_change_tail(skb, len + hl, 0);
    if (r)
        r->r1 = e;
    if (e)
        return -101;
    __u32 rem = len - at;
    for (int k = 0; k < GK_MOVE_CHUNKS; k++) {
        if (rem == 0)
            break;
        __u32 c = rem > GK_CHUNK ? GK_CHUNK : rem;
        __u32 src = at + rem - c;
        c = ((c - 1) & (GK_CHUNK - 1)) + 1; /* [1, GK_CHUNK] for the verifier */
        if (bpf_skb_load_bytes(skb, src, sb->tmp, c) < 0)
            return -103;
        if (bpf_skb_store_bytes(skb, src + hl, sb->tmp, c, 0) < 0)
            return -104;
        rem -= c;
    }
    if (rem)
        return -105; /* more than GK_MOVE_CHUNKS * GK_CHUNK bytes behind the head */
    e = bpf_skb_store_bytes(skb, at, sb->line, ((hl - 1) & 63) + 1, 0);
    if (r)
        r->r2 = e;
    return e ? -106 : 0;
}

#define GK_REPLY_TEXT "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nserver: gk-kernel\r\n\r\nkernel"

static __always_inline int gk_reply(struct __sk_buff *skb, struct gk_rec *r)
{
    char reply[] = GK_REPLY_TEXT;
    __u32 rl = sizeof(reply) - 1;
    int e = bpf_skb_change_tail(skb, rl, 0);
    if (r)
        r->r1 = e;
    if (e)
        return e;
    e = bpf_skb_store_bytes(skb, 0, reply, rl, 0);
    if (r)
        r->r2 = e;
    return e;
}

static __always_inline int gk_to_self(struct __sk_buff *skb, struct gk_cfg *cfg, __u64 *self)
{
    if (cfg->raw) {
        return gk_raw.sk_redirect_hash(skb, self, 0);
    }
    return gk_strp.sk_redirect_hash(skb, self, 0);
}

int gk_verdict(struct __sk_buff *skb)
{
    __u32 z = 0, one = 1;
    struct gk_cfg *cfg = gk_cfg_m.lookup(&z);
    struct gk_buf *sb = gk_scratch.lookup(&z);
    __u32 *seen = gk_n.lookup(&one);
    struct gk_rec *r = gk_next(GK_K_VERDICT);
    if (!cfg || !sb || !seen)
        return SK_PASS;
    if (r)
        gk_snap(skb, r);
    if (!skb->len)
        return SK_PASS; /* a FIN (verdict alone): rewritten, it would be a second reply */
    __u32 nth = *seen;
    *seen += 1;
    __u32 mode = nth < cfg->pass_first ? GK_PASS : cfg->mode;
    __u64 up = GK_UP_KEY, srv = GK_SRV_KEY;
    __u64 self = gk_port(skb->remote_port);
    int ret = SK_PASS;
    if (mode == GK_FWD) {
        ret = gk_up.sk_redirect_hash(skb, &up, 0);
    } else if (mode == GK_FWD_INGRESS) {
        ret = gk_up.sk_redirect_hash(skb, &srv, BPF_F_INGRESS);
    } else if (mode == GK_XFF) {
        __u32 clen = 0;
        __u32 n = gk_load_head(skb, sb->b);
        __u32 end = gk_head(sb, n, &clen);
        if (end >= 4) {
            sb->hl = gk_xff_line(sb->line, skb->remote_ip4);
            __u32 hl = *(volatile __u32 *)&sb->hl;
            int e = gk_insert(skb, sb, end - 2, hl, r);
            if (e == 0)
                ret = gk_up.sk_redirect_hash(skb, &up, 0);
            else if (r)
                r->r2 = e;
        }
    } else if (mode == GK_REPLY) {
        if (gk_reply(skb, r) == 0)
            ret = gk_to_self(skb, cfg, &self);
    }
    if (r)
        r->ret = ret;
    return ret;
}

int gk_up_verdict(struct __sk_buff *skb)
{
    __u32 z = 0;
    struct gk_cfg *cfg = gk_cfg_m.lookup(&z);
    struct gk_rec *r = gk_next(GK_K_UP);
    if (!cfg)
        return SK_PASS;
    if (r)
        gk_snap(skb, r);
    if (!skb->len)
        return SK_PASS; /* a FIN */
    __u64 cli = cfg->client_key;
    int ret = gk_to_self(skb, cfg, &cli);
    if (r)
        r->ret = ret;
    return ret;
}
