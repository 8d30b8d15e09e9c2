/* HTTP/1.1 request-head parser over (data, data_end), for l7fp_decide.
 *
 * Owned by the decision engine (K1). Pure: no socket helpers, so the same code
 * runs in sk_msg (the data path) and in sched_cls (the BPF_PROG_TEST_RUN
 * harness, test_decide.c).
 *
 * How it stays verifiable: the head is copied once into the per-CPU scratch
 * (l7fp_req_ctx.buf); every read afterwards is an index masked into that
 * buffer, and all scanner state lives in the scratch (memory), not in
 * registers, so the verifier sees one small state per byte position instead of
 * one per combination of counters. Loops have constant bounds.
 *
 * What it accepts: "METHOD SP origin-form SP HTTP/1.1 CRLF", header lines
 * "name: value CRLF" (name of tchars, no space before the colon), a blank line.
 * Anything else -- a limit hit, chunked, Expect, Upgrade, CONNECT, HTTP/1.0, the
 * HTTP/2 preface, absolute-form targets, obs-fold, bare LF, control bytes,
 * bad or duplicate Content-Length, missing or duplicate Host -- is PASS, i.e.
 * Envoy decides.
 */
#ifndef L7FP_HTTP_H
#define L7FP_HTTP_H

#include "l7fp_maps.h"

/* Forces the compiler to reload scanner state from the scratch each round. */
#define L7FP_BARRIER() asm volatile("" ::: "memory")

#define L7FP_W8(a, b, c, d, e, f, g, h)                                              \
    ((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 |            \
     (__u64)(e) << 32 | (__u64)(f) << 40 | (__u64)(g) << 48 | (__u64)(h) << 56)

#define L7FP_W_HTTP11 L7FP_W8('H', 'T', 'T', 'P', '/', '1', '.', '1')
#define L7FP_W_HTTP10 L7FP_W8('H', 'T', 'T', 'P', '/', '1', '.', '0')
#define L7FP_W_PRI L7FP_W8('P', 'R', 'I', ' ', 0, 0, 0, 0)
#define L7FP_W_HEAD L7FP_W8('H', 'E', 'A', 'D', 0, 0, 0, 0)
#define L7FP_W_CONNECT L7FP_W8('C', 'O', 'N', 'N', 'E', 'C', 'T', 0)
#define L7FP_W_HOST L7FP_W8('h', 'o', 's', 't', 0, 0, 0, 0)
#define L7FP_W_EXPECT L7FP_W8('e', 'x', 'p', 'e', 'c', 't', 0, 0)
#define L7FP_W_UPGRADE L7FP_W8('u', 'p', 'g', 'r', 'a', 'd', 'e', 0)
#define L7FP_W_CONTENT L7FP_W8('c', 'o', 'n', 't', 'e', 'n', 't', '-')
#define L7FP_W_T_LENGTH L7FP_W8('t', '-', 'l', 'e', 'n', 'g', 't', 'h')
#define L7FP_W_TRANSFER L7FP_W8('t', 'r', 'a', 'n', 's', 'f', 'e', 'r')
#define L7FP_W_ENCODING L7FP_W8('e', 'n', 'c', 'o', 'd', 'i', 'n', 'g')
#define L7FP_W_GRPC_TI L7FP_W8('g', 'r', 'p', 'c', '-', 't', 'i', 'm')
#define L7FP_W_C_TIMEOUT L7FP_W8('-', 't', 'i', 'm', 'e', 'o', 'u', 't')
#define L7FP_W_X_ENVOY L7FP_W8('x', '-', 'e', 'n', 'v', 'o', 'y', '-')
#define L7FP_W_X_FORWAR L7FP_W8('x', '-', 'f', 'o', 'r', 'w', 'a', 'r')
#define L7FP_W_ENT_CERT L7FP_W8('e', 'n', 't', '-', 'c', 'e', 'r', 't')
#define L7FP_W_ENT_TYPE L7FP_W8('e', 'n', 't', '-', 't', 'y', 'p', 'e')
#define L7FP_W_APPLICAT L7FP_W8('a', 'p', 'p', 'l', 'i', 'c', 'a', 't')
#define L7FP_W_ION_GRPC L7FP_W8('i', 'o', 'n', '/', 'g', 'r', 'p', 'c')

/* Low n bytes of a word (n <= 8). */
static __always_inline __u64 l7fp_lowbytes(__u64 w, __u32 n)
{
    if (n >= 8)
        return w;
    return w & ((1ULL << (n * 8)) - 1);
}

/* 'A'..'Z' to lower case in all 8 bytes at once; other bytes unchanged. */
static __always_inline __u64 l7fp_lower64(__u64 x)
{
    __u64 hi = 0x8080808080808080ULL;
    __u64 a = (x | hi) - 0x4141414141414141ULL; /* high bit kept: byte >= 'A' */
    __u64 b = (x | hi) - 0x5b5b5b5b5b5b5b5bULL; /* high bit kept: byte >= '[' */
    __u64 m = a & ~b & ~x & hi;
    return x | (m >> 2);
}

/* off masked into the scratch buffer. The mask is done in asm so the compiler
 * cannot drop it when it proves a range the verifier does not track. */
static __always_inline __u64 l7fp_bmask(__u64 off)
{
    asm volatile("%0 &= %1" : "+r"(off) : "i"(L7FP_BUF_MASK));
    return off;
}

/* 8 bytes of the scratch buffer at off (masked: always inside the buffer). */
static __always_inline __u64 l7fp_load64(struct l7fp_req_ctx *c, __u32 off)
{
    return *(__u64 *)(c->buf + l7fp_bmask(off));
}

static __always_inline __u8 l7fp_byte(struct l7fp_req_ctx *c, __u32 off)
{
    return c->buf[l7fp_bmask(off)];
}

/* Branch-free arithmetic on u64 values below 2^62. The asm hides the
 * operands from the compiler, which would otherwise turn the arithmetic back
 * into compares and selects -- and BPF has no conditional move, so every
 * select becomes a branch, and every branch in a loop body multiplies the
 * states the verifier walks. */
static __always_inline __u64 l7fp_opq(__u64 v)
{
    asm volatile("" : "+r"(v));
    return v;
}
#define L7FP_EQ(x, k) ((l7fp_opq((__u64)(x) ^ (__u64)(k)) - 1) >> 63)
#define L7FP_NZ(x) (1 - L7FP_EQ(x, 0))
#define L7FP_LT(a, b) ((l7fp_opq((__u64)(a)) - (__u64)(b)) >> 63)
/* c in {0, 1}. A multiply, not "& -c": the verifier forks its state on a
 * value in {-1, 0} that is and-ed, which would undo the point of going
 * branch-free. */
#define L7FP_SEL(c, a, b) ((__u64)(b) + ((__u64)(a) - (__u64)(b)) * (__u64)(c))
#define L7FP_BIT(cls, n) (((cls) >> (n)) & 1)

/* A request line / header byte: update the scanner state in c->r without a
 * branch. `cc` is the byte-class table (L7FP_C_* bits, fastpath.synth). */
static __always_inline void l7fp_scan_byte(struct l7fp_req_ctx *c, struct l7fp_cclass *cc,
                                           __u64 i)
{
    struct l7fp_req *r = &c->r;
    __u64 ch = c->buf[i & L7FP_HDR_MASK];
    __u64 cls = cc->c[ch & 0xff];
    __u64 prev = l7fp_byte(c, i - 1), nxt = l7fp_byte(c, i + 1);
    __u64 is_lf = L7FP_EQ(ch, '\n'), is_cr = L7FP_EQ(ch, '\r'), crlf = is_lf | is_cr;
    __u64 nl = r->nlines, line0 = L7FP_EQ(nl, 0), hdrl = 1 - line0;
    __u64 colon = r->cur_colon, colon0 = L7FP_EQ(colon, 0), start = r->cur_start;
    __u64 at_start = L7FP_EQ(i, start);
    __u64 bad = 0, bad_m = 0, many = 0;

    /* header line: name of tchars up to the first ':', then value bytes */
    __u64 in_name = hdrl & colon0 & (1 - crlf);
    __u64 is_colon = L7FP_BIT(cls, L7FP_C_COLON);
    __u64 set_colon = in_name & is_colon & (1 - at_start);
    bad |= in_name & (1 - is_colon) & (1 - L7FP_BIT(cls, L7FP_C_TCHAR));
    bad |= in_name & is_colon & at_start;
    bad |= hdrl & (1 - colon0) & (1 - crlf) & (1 - L7FP_BIT(cls, L7FP_C_VALUE));

    /* request line: METHOD SP target SP version */
    __u64 l0 = line0 & (1 - crlf), is_sp = L7FP_BIT(cls, L7FP_C_SP);
    __u64 sp1z = L7FP_EQ(r->sp1, 0), sp2z = L7FP_EQ(r->sp2, 0), qz = L7FP_EQ(r->q, 0);
    __u64 set_sp1 = l0 & is_sp & sp1z, set_sp2 = l0 & is_sp & (1 - sp1z) & sp2z;
    bad |= l0 & is_sp & ((1 - sp2z) | L7FP_EQ(i, 0)); /* third space, or no method */
    bad_m = l0 & sp1z & (1 - is_sp) & (1 - L7FP_BIT(cls, L7FP_C_UPPER));
    __u64 in_tgt = l0 & (1 - sp1z) & sp2z & (1 - is_sp);
    bad |= in_tgt & (1 - L7FP_BIT(cls, L7FP_C_TARGET));
    __u64 is_q = L7FP_BIT(cls, L7FP_C_QMARK);
    __u64 set_q = in_tgt & is_q & qz, in_path = in_tgt & qz & (1 - is_q);
    /* "//" in the path, or a "." / ".." segment ending here ('/', '?' or the
     * space after the target): Envoy may normalize, so it decides */
    __u64 p2 = l7fp_byte(c, i - 2), p3 = l7fp_byte(c, i - 3);
    __u64 is_sl = L7FP_EQ(ch, '/');
    __u64 seg_end = (in_path & is_sl) | set_q | (set_sp2 & qz);
    __u64 dotseg = L7FP_EQ(prev, '.') &
                   (L7FP_EQ(p2, '/') | (L7FP_EQ(p2, '.') & L7FP_EQ(p3, '/')));
    __u64 dots = (in_path & is_sl & L7FP_EQ(prev, '/')) | (seg_end & dotseg);
    r->tflags |= (in_path & L7FP_BIT(cls, L7FP_C_PCT)) | (dots << 1);

    /* CR only before LF; LF only after CR; the blank line ends the head */
    bad |= is_cr & L7FP_LT(i + 1, r->len) & (1 - L7FP_EQ(nxt, '\n'));
    bad |= is_lf & ((1 - L7FP_EQ(prev, '\r')) | L7FP_EQ(i, 0));
    __u64 blank = is_lf & L7FP_EQ(i - 1, start);
    bad |= blank & line0;
    __u64 newline = is_lf & (1 - blank);
    many = newline & (1 - L7FP_LT(nl, L7FP_MAX_LINES));
    bad |= newline & hdrl & colon0;
    r->hdr_len |= (i + 1) * (blank & hdrl);

    __u32 k = nl & L7FP_LINE_MASK;
    r->ls[k] = L7FP_SEL(newline, start, r->ls[k]);
    r->le[k] = L7FP_SEL(newline, i - 1, r->le[k]);
    r->lc[k] = L7FP_SEL(newline, colon, r->lc[k]);
    r->nlines = nl + newline;
    r->cur_start = L7FP_SEL(newline, i + 1, start);
    r->cur_colon = L7FP_SEL(newline, 0, colon | (i * set_colon));
    r->sp1 |= i * set_sp1;
    r->sp2 |= i * set_sp2;
    r->q |= i * set_q;
    r->bad = L7FP_SEL(bad, L7FP_R_UNPARSED,
                      L7FP_SEL(bad_m, L7FP_R_METHOD, L7FP_SEL(many, L7FP_R_TOO_LARGE, 0)));
}

/* Finds the lines of the head; sets r->hdr_len when the blank line is seen. */
static __always_inline void l7fp_scan(struct l7fp_req_ctx *c)
{
    struct l7fp_req *r = &c->r;
    __u32 zero = 0;
    struct l7fp_cclass *cc = l7fp_cclass.lookup(&zero);
    if (!cc) {
        r->bad = L7FP_R_UNPARSED;
        return;
    }
    for (__u32 i = 0; i < L7FP_MAX_HDR; i++) {
        L7FP_BARRIER();
        if (i >= r->len || r->bad || r->hdr_len)
            break;
        l7fp_scan_byte(c, cc, i);
    }
}

/* Methods Envoy 1.40's HTTP/1 codec (Balsa) accepts, of at most 8 bytes (a
 * longer method is L7FP_R_METHOD already; CONNECT is L7FP_R_UPGRADE). Envoy
 * answers any other upper-case word 400 itself ("FOO", "QUERY", "PRI"), so the
 * kernel hands it to Envoy rather than forward it. The list is checked against
 * the binary: tests/split/test_methods_envoy.py (fastpath.reference.ENVOY_METHODS). */
static __always_inline __u64 l7fp_known_method(__u64 m)
{
    return (
             L7FP_EQ(m, L7FP_W8('A', 'C', 'L', 0, 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('B', 'I', 'N', 'D', 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('C', 'H', 'E', 'C', 'K', 'O', 'U', 'T'))
           | L7FP_EQ(m, L7FP_W8('C', 'O', 'P', 'Y', 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('D', 'E', 'L', 'E', 'T', 'E', 0, 0))
           | L7FP_EQ(m, L7FP_W8('G', 'E', 'T', 0, 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('H', 'E', 'A', 'D', 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('L', 'I', 'N', 'K', 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('L', 'O', 'C', 'K', 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('M', 'E', 'R', 'G', 'E', 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('M', 'K', 'C', 'O', 'L', 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('M', 'O', 'V', 'E', 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('M', 'S', 'E', 'A', 'R', 'C', 'H', 0))
           | L7FP_EQ(m, L7FP_W8('N', 'O', 'T', 'I', 'F', 'Y', 0, 0))
           | L7FP_EQ(m, L7FP_W8('O', 'P', 'T', 'I', 'O', 'N', 'S', 0))
           | L7FP_EQ(m, L7FP_W8('P', 'A', 'T', 'C', 'H', 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('P', 'O', 'S', 'T', 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('P', 'R', 'O', 'P', 'F', 'I', 'N', 'D'))
           | L7FP_EQ(m, L7FP_W8('P', 'U', 'R', 'G', 'E', 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('P', 'U', 'T', 0, 0, 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('R', 'E', 'B', 'I', 'N', 'D', 0, 0))
           | L7FP_EQ(m, L7FP_W8('R', 'E', 'P', 'O', 'R', 'T', 0, 0))
           | L7FP_EQ(m, L7FP_W8('S', 'E', 'A', 'R', 'C', 'H', 0, 0))
           | L7FP_EQ(m, L7FP_W8('S', 'O', 'U', 'R', 'C', 'E', 0, 0))
           | L7FP_EQ(m, L7FP_W8('T', 'R', 'A', 'C', 'E', 0, 0, 0))
           | L7FP_EQ(m, L7FP_W8('U', 'N', 'B', 'I', 'N', 'D', 0, 0))
           | L7FP_EQ(m, L7FP_W8('U', 'N', 'L', 'I', 'N', 'K', 0, 0))
           | L7FP_EQ(m, L7FP_W8('U', 'N', 'L', 'O', 'C', 'K', 0, 0)));
}

/* Request line: method word, HTTP/1.1, origin-form target. 0 or a PASS reason. */
static __always_inline __u32 l7fp_parse_reqline(struct l7fp_req_ctx *c)
{
    struct l7fp_req *r = &c->r;
    __u32 sp1 = r->sp1, sp2 = r->sp2, end = r->le[0];
    if (!sp1 || !sp2 || sp2 <= sp1 + 1)
        return L7FP_R_UNPARSED;
    if (end != sp2 + 9) {
        return L7FP_R_HTTP10; /* not an 8-byte version token */
    }
    __u64 ver = l7fp_load64(c, sp2 + 1);
    if (ver == L7FP_W_HTTP10)
        return L7FP_R_HTTP10;
    if (ver != L7FP_W_HTTP11)
        return L7FP_R_HTTP10;
    if (sp1 > 8)
        return L7FP_R_METHOD;
    r->method_len = sp1;
    r->method = l7fp_lowbytes(l7fp_load64(c, 0), sp1);
    if (r->method == L7FP_W_CONNECT && sp1 == 7)
        return L7FP_R_UPGRADE;
    if (!l7fp_known_method(r->method))
        return L7FP_R_METHOD;
    if (l7fp_byte(c, sp1 + 1) != '/')
        return L7FP_R_UNPARSED; /* absolute-form, asterisk-form: Envoy */
    r->path_off = sp1 + 1;
    r->path_len = (r->q ? r->q : sp2) - (sp1 + 1);
    return 0;
}

/* Value of a header line, trimmed of SP/HT: sets *vs, *ve. 0 or a PASS
 * reason (more than two padding bytes on a side: Envoy decides). */
static __always_inline __u32 l7fp_header_value(struct l7fp_req_ctx *c, __u32 col, __u32 e,
                                                __u32 *vs, __u32 *ve)
{
    __u32 s = col + 1;
    __u8 b;
#pragma unroll
    for (int j = 0; j < 3; j++) {
        b = l7fp_byte(c, s);
        if (s < e && (b == ' ' || b == '\t')) {
            if (j == 2)
                return L7FP_R_UNPARSED;
            s++;
        }
    }
#pragma unroll
    for (int j = 0; j < 3; j++) {
        b = l7fp_byte(c, e - 1);
        if (e > s && (b == ' ' || b == '\t')) {
            if (j == 2)
                return L7FP_R_UNPARSED;
            e--;
        }
    }
    *vs = s;
    *ve = e;
    return 0;
}

/* Content-Length value: 1 to 8 digits, parsed 8 bytes at once. 0 or
 * L7FP_R_BAD_CL. */
static __always_inline __u32 l7fp_parse_cl(struct l7fp_req_ctx *c, __u32 vs, __u32 ve)
{
    struct l7fp_req *r = &c->r;
    __u32 n = ve - vs;
    if (r->seen & L7FP_SEEN_CL || n == 0 || n > 8)
        return L7FP_R_BAD_CL;
    /* right-align the n digits in a word padded with '0' on the left */
    __u64 w = l7fp_lowbytes(l7fp_load64(c, vs), n);
    __u32 pad = (8 - n) * 8;
    w = (w << pad) | l7fp_lowbytes(0x3030303030303030ULL, 8 - n);
    /* every byte in '0'..'9': (b - '0') < 10 without borrow */
    __u64 d = w - 0x3030303030303030ULL;
    __u64 over = (d + 0x7676767676767676ULL) | d; /* high bit set: > 9 or borrow */
    if ((over & 0x8080808080808080ULL) || ((w & 0xf0f0f0f0f0f0f0f0ULL) != 0x3030303030303030ULL))
        return L7FP_R_BAD_CL;
    /* SWAR decimal: pairs, quads, then the 8-digit value (byte 0 is most significant) */
    d = (d * 10) + (d >> 8);
    d = (((d & 0x000000FF000000FFULL) * 0x000F424000000064ULL) +
         (((d >> 16) & 0x000000FF000000FFULL) * 0x0000271000000001ULL)) >> 32;
    r->cl = (__u32)d;
    r->seen |= L7FP_SEEN_CL;
    return 0;
}

/* Records the value of a header whose name the plan matches on. */
static __always_inline void l7fp_note_slot(struct l7fp_req_ctx *c, struct l7fp_hname_key *key,
                                           __u32 vs, __u32 ve)
{
#if L7FP_F_HDR_MATCH || L7FP_F_HDR_ADD
    __u32 *slot = l7fp_hnames.lookup(key);
    if (!slot)
        return;
    __u32 s = *slot & L7FP_SLOT_MASK;
    if (c->r.slot_len[s])
        c->r.slot_len[s] = 0xffffffff; /* duplicate: matchers on it PASS */
    else
        c->r.slot_len[s] = ve - vs + 1;
    c->r.slot_off[s] = vs;
#endif
}

/* Header line k (k >= 1). 0 or a PASS reason. */
static __always_inline __u32 l7fp_parse_header(struct l7fp_req_ctx *c, __u32 k, __u32 gen)
{
    struct l7fp_req *r = &c->r;
    __u32 s = r->ls[k & L7FP_LINE_MASK], e = r->le[k & L7FP_LINE_MASK];
    __u32 col = r->lc[k & L7FP_LINE_MASK];
    __u32 vs = 0, ve = 0, why;
    if (col <= s)
        return L7FP_R_UNPARSED;
    why = l7fp_header_value(c, col, e, &vs, &ve);
    if (why)
        return why;
    struct l7fp_hname_key key = {};
    key.len = col - s;
    key.pad = gen;
    key.w0 = l7fp_lowbytes(l7fp_lower64(l7fp_load64(c, s)), key.len);
    if (key.len > 8)
        key.w1 = l7fp_lower64(l7fp_load64(c, col - 8));
#if L7FP_F_LONG_NAMES /* a value matcher on a 17..24-byte name: its key must be exact */
    if (key.len > 16)
        key.w2 = l7fp_lowbytes(l7fp_lower64(l7fp_load64(c, s + 8)), key.len - 16);
#endif
    if (key.len == 4 && key.w0 == L7FP_W_HOST) {
        if (r->seen & L7FP_SEEN_HOST || ve == vs)
            return L7FP_R_NO_HOST;
        r->seen |= L7FP_SEEN_HOST;
        r->host_off = vs;
        r->host_len = ve - vs;
        return 0;
    }
    if (key.len == 14 && key.w0 == L7FP_W_CONTENT && key.w1 == L7FP_W_T_LENGTH)
        return l7fp_parse_cl(c, vs, ve);
    /* 17 bytes: the middle byte is not compared; a false hit only means PASS */
    if (key.len == 17 && key.w0 == L7FP_W_TRANSFER && key.w1 == L7FP_W_ENCODING)
        return L7FP_R_CHUNKED;
    /* gRPC (content-type application/grpc or application/grpc+..., compared
     * case-sensitively as Envoy does): Envoy's local replies to it are gRPC ones */
    if (key.len == 12 && key.w0 == L7FP_W_CONTENT && key.w1 == L7FP_W_ENT_TYPE &&
        l7fp_load64(c, vs) == L7FP_W_APPLICAT && l7fp_load64(c, vs + 8) == L7FP_W_ION_GRPC &&
        (ve - vs == 16 || (ve - vs > 16 && l7fp_byte(c, vs + 16) == '+')))
        return L7FP_R_UNPARSED;
    if (key.len == 6 && key.w0 == L7FP_W_EXPECT)
        return L7FP_R_EXPECT;
    if (key.len == 7 && key.w0 == L7FP_W_UPGRADE)
        return L7FP_R_UPGRADE;
    /* Envoy may enforce grpc-timeout as a request timeout */
    if (key.len == 12 && key.w0 == L7FP_W_GRPC_TI && key.w1 == L7FP_W_C_TIMEOUT)
        return L7FP_R_UNPARSED;
    /* x-envoy-*: Envoy acts on some (x-envoy-upstream-rq-timeout-ms may set its
     * timeout), strips or overwrites others (x-envoy-internal, -retry-on,
     * -ip-tags, -force-trace, -expected-rq-timeout-ms); the kernel
     * would pass them all to the upstream (tests/split/test_stripped_headers_envoy.py) */
    if (key.len > 8 && key.w0 == L7FP_W_X_ENVOY) {
        r->tflags |= L7FP_TF_ENVOY_HDR; /* the head is parsed on: Envoy gets it whole */
        return 0;
    }
    /* x-forwarded-client-cert: Envoy's default (SANITIZE) removes it, so an app
     * never sees a client's forged one on the slow path; 23 bytes, last 8 "ent-cert" */
    if (key.len == 23 && key.w0 == L7FP_W_X_FORWAR && key.w1 == L7FP_W_ENT_CERT) {
        r->tflags |= L7FP_TF_ENVOY_HDR;
        return 0;
    }
    /* names over 16 bytes (24 with L7FP_F_LONG_NAMES) can share a key: the
     * synthesis gives them slots only for must-be-absent checks, where a false
     * hit only sends the request to Envoy (fastpath/synth_tables.py _slot) */
    l7fp_note_slot(c, &key, vs, ve);
    return 0;
}

/* Zeroes what the parser reads before writing (a memset of the whole struct
 * would become a libcall BPF cannot make). Line arrays are written first. */
static __always_inline void l7fp_req_reset(struct l7fp_req *r)
{
    r->hdr_len = r->nlines = r->bad = r->cur_start = r->cur_colon = 0;
    r->sp1 = r->sp2 = r->q = r->tflags = r->method_len = 0;
    r->method = 0;
    r->path_off = r->path_len = r->host_off = r->host_len = r->cl = r->seen = 0;
#pragma unroll
    for (int j = 0; j < L7FP_MAX_SLOTS; j++)
        r->slot_len[j] = 0;
}

/* 1 when the Host value is not a plain authority (Envoy answers 400 to an
 * invalid one, or it is longer than L7FP_MAX_HOST): target-safe bytes only,
 * no '/' or '?'. The verdict accumulates in the scratch, no branch per byte. */
static __always_inline __u32 l7fp_host_bad(struct l7fp_req_ctx *c)
{
    struct l7fp_req *r = &c->r;
    __u32 zero = 0;
    struct l7fp_cclass *cc = l7fp_cclass.lookup(&zero);
    if (!cc || r->host_len > L7FP_MAX_HOST)
        return 1;
    r->rb_bad = 0; /* reused as the accumulator (RBAC runs later) */
    for (__u32 j = 0; j < L7FP_MAX_HOST; j++) {
        L7FP_BARRIER();
        if (j >= r->host_len)
            break;
        __u64 ch = l7fp_byte(c, r->host_off + j);
        __u64 ok = L7FP_BIT(cc->c[ch & 0xff], L7FP_C_TARGET) & (1 - L7FP_EQ(ch, '/')) &
                   (1 - L7FP_EQ(ch, '?'));
        r->rb_bad |= 1 - ok;
    }
    L7FP_BARRIER();
    return r->rb_bad;
}

/* Parses the head at the start of (data, data_end) into c->r.
 * Returns 0 when a complete head parsed, else L7FP_NEED_MORE or L7FP_PASS with
 * the reason in *why. */
static __always_inline __u32 l7fp_parse(struct l7fp_req_ctx *c, void *data, void *data_end,
                                        __u32 gen, __u32 *why)
{
    struct l7fp_req *r = &c->r;
    l7fp_req_reset(r);
    long avail = (long)data_end - (long)data;
    if (avail <= 0)
        return L7FP_NEED_MORE;
    __u32 n = avail > L7FP_MAX_HDR ? L7FP_MAX_HDR : (__u32)avail;
    n &= L7FP_BUF_MASK; /* for the verifier: n < buffer size */
    if (bpf_probe_read_kernel(c->buf, n, data) != 0) {
        *why = L7FP_R_UNPARSED;
        return L7FP_PASS;
    }
    r->len = n;
    r->data_len = avail > L7FP_MAX_HDR ? L7FP_MAX_HDR : (__u32)avail;
    /* From here on everything is read back from the scratch: the paths above
     * leave different values in registers, and the scan loop must be entered
     * with one verifier state, not one per path. */
    L7FP_BARRIER();
    l7fp_scan(c);
    L7FP_BARRIER();
    if ((l7fp_load64(c, 0) & 0xffffffffULL) == L7FP_W_PRI && r->len >= 4) {
        *why = L7FP_R_H2;
        return L7FP_PASS;
    }
    if (r->bad) {
        *why = r->bad;
        return L7FP_PASS;
    }
    if (!r->hdr_len) {
        if (r->data_len >= L7FP_MAX_HDR) {
            *why = L7FP_R_TOO_LARGE;
            return L7FP_PASS;
        }
        return L7FP_NEED_MORE;
    }
    *why = l7fp_parse_reqline(c);
    if (*why)
        return L7FP_PASS;
    for (__u32 k = 1; k < L7FP_MAX_LINES; k++) {
        L7FP_BARRIER();
        if (k >= r->nlines)
            break;
        *why = l7fp_parse_header(c, k, gen);
        if (*why)
            return L7FP_PASS;
    }
    if (!(r->seen & L7FP_SEEN_HOST) || l7fp_host_bad(c)) {
        *why = L7FP_R_NO_HOST;
        return L7FP_PASS;
    }
    return 0;
}

#endif /* L7FP_HTTP_H */
