/* Query-parameter matchers of routes (Envoy RouteMatch.query_parameters).
 *
 * Owned by the decision engine (K1); called only by l7fp_decide
 * (l7fp_decide.h): l7fp_query_scan once per decision, l7fp_query_match for
 * each route whose path, method and headers matched. The reference model
 * (fastpath.reference._query_value) is the oracle; the semantics were checked
 * against Envoy 1.40 (tests/split/test_query_envoy.py): parameters are split
 * on '&' (empty ones skipped), the name is up to the first '=', a parameter
 * without '=' has the value "", the first occurrence of a name counts, names
 * are case-sensitive. '%' never reaches here (the parser hands it to Envoy);
 * a query with '+' (Envoy may decode it), more than L7FP_MAX_QPARAMS
 * parameters or longer than L7FP_MAX_QUERY bytes is undecidable: PASS.
 *
 * Table: l7fp_qmatch[gen * N + route_id * L7FP_MAX_QMATCH + j] is matcher j
 * of the route (kind 0: no more matchers), written by fastpath.synth_tables.
 */
#ifndef L7FP_QUERY_H
#define L7FP_QUERY_H

#include "l7fp_match.h"

#ifndef L7FP_F_QUERY
#define L7FP_F_QUERY 0 /* query-parameter matchers on routes (only plans with one) */
#endif
#ifndef L7FP_MAX_QUERY
#define L7FP_MAX_QUERY 128 /* query bytes scanned; a longer query: PASS */
#endif
#ifndef L7FP_MAX_QPARAMS
#define L7FP_MAX_QPARAMS 8 /* parameters recorded (power of 2); more: PASS */
#endif
#ifndef L7FP_MAX_QMATCH
#define L7FP_MAX_QMATCH 2 /* query matchers per route (the table's stride) */
#endif
#ifndef L7FP_N_QMATCH
#define L7FP_N_QMATCH (L7FP_N_ROUTES * L7FP_MAX_QMATCH)
#endif
#define L7FP_QP_MASK (L7FP_MAX_QPARAMS - 1)

struct l7fp_qmatch {
    __u32 kind;   /* L7FP_SM_EXACT / PREFIX / SUFFIX / PRESENT; 0 = none */
    __u32 nlen;   /* name length, 1..16 (case-sensitive) */
    __u64 nw[2];  /* name bytes, little-endian words, 0-padded */
    __u64 nm[2];  /* masks of the name's bytes in each word */
    struct l7fp_str v; /* value (L7FP_STR_CI: ignore_case) */
};

/* The query's parameters, as l7fp_query_scan found them: parameter k is
 * [ps[k], pe[k]) with its first '=' at eq[k] (eq[k] == pe[k]: none). */
struct l7fp_qparse {
    __u32 n;
    __u32 bad; /* 1: the kernel cannot tell what Envoy would see */
    __u32 base, len, start, eqp; /* scanner state */
    __u32 ps[L7FP_MAX_QPARAMS];
    __u32 eq[L7FP_MAX_QPARAMS];
    __u32 pe[L7FP_MAX_QPARAMS];
};

BPF_ARRAY(l7fp_qmatch, struct l7fp_qmatch, 2 * L7FP_N_QMATCH);
BPF_PERCPU_ARRAY(l7fp_qscan, struct l7fp_qparse, 1);

#if L7FP_F_QUERY
/* Query byte j (at qp->base + j; the last one, j == qp->len - 1, is the space
 * after the target). Branch-free, and all the state is in the map value, as
 * in l7fp_scan: the verifier's states at the loop's exits are then equal and
 * pruned (state in registers cost ~600 k more instructions). */
static __always_inline void l7fp_qscan_byte(struct l7fp_req_ctx *c, struct l7fp_qparse *qp,
                                            __u64 j)
{
    __u64 i = qp->base + j, start = qp->start, eq = qp->eqp;
    __u64 ch = l7fp_byte(c, i);
    __u64 stop = L7FP_EQ(ch, '&') | L7FP_EQ(j + 1, qp->len);
    __u64 first_eq = L7FP_EQ(ch, '=') & L7FP_EQ(eq, 0) & (1 - stop);
    __u64 e = L7FP_SEL(first_eq, i, eq);
    __u64 commit = stop & L7FP_LT(start, i); /* a non-empty parameter ends here */
    __u32 k = qp->n & L7FP_QP_MASK;
    qp->bad |= L7FP_EQ(ch, '+');
    qp->ps[k] = L7FP_SEL(commit, start, qp->ps[k]);
    qp->eq[k] = L7FP_SEL(commit, L7FP_SEL(L7FP_EQ(e, 0), i, e), qp->eq[k]);
    qp->pe[k] = L7FP_SEL(commit, i, qp->pe[k]);
    qp->n += commit;
    qp->start = L7FP_SEL(stop, i + 1, start);
    qp->eqp = L7FP_SEL(stop, 0, e);
}
#endif

/* Splits the query of the parsed request into parameters (l7fp_qscan). */
static __always_inline void l7fp_query_scan(struct l7fp_req_ctx *c)
{
#if L7FP_F_QUERY
    __u32 zero = 0;
    struct l7fp_qparse *qp = l7fp_qscan.lookup(&zero);
    if (!qp)
        return;
    __u32 q = c->r.q, end = c->r.sp2;
    qp->n = qp->bad = qp->eqp = qp->len = 0;
    qp->base = qp->start = q + 1;
    if (!q)
        return;
    if (end > q + 1 + L7FP_MAX_QUERY) {
        qp->bad = 1;
        return;
    }
    qp->len = end - q; /* the query bytes and the space after them */
    for (__u32 j = 0; j <= L7FP_MAX_QUERY; j++) {
        L7FP_BARRIER();
        if (j >= qp->len)
            break;
        l7fp_qscan_byte(c, qp, j);
    }
    if (qp->n > L7FP_MAX_QPARAMS)
        qp->bad = 1;
#endif
}

/* Parameter name at off equals m's (up to 16 bytes, two masked words), as
 * a value with no branch: a compare in the loop over the parameters would fork
 * the verifier's state at each of them. */
static __always_inline __u64 l7fp_qname_eq(struct l7fp_req_ctx *c, __u32 off,
                                           struct l7fp_qmatch *m)
{
    __u64 diff = ((l7fp_load64(c, off) & m->nm[0]) ^ m->nw[0]) |
                 ((l7fp_load64(c, off + 8) & m->nm[1]) ^ m->nw[1]);
    /* diff == 0: the high bit of (diff | -diff) is 0 only for 0 */
    return 1 - ((l7fp_opq(diff) | (0 - diff)) >> 63);
}

/* One matcher against the scanned parameters: 1 match, 0 no match. The
 * first parameter with the name counts (Envoy's getFirstValue). */
static __always_inline int l7fp_qparam_match(struct l7fp_req_ctx *c, struct l7fp_qparse *qp,
                                             struct l7fp_qmatch *m)
{
    __u64 n = m->nlen, found = 0, at = 0, cnt = qp->n;
    /* not unrolled: the data path's sk_msg program is near its 512-byte stack */
#pragma clang loop unroll(disable)
    for (__u32 k = 0; k < L7FP_MAX_QPARAMS; k++) {
        __u64 ps = qp->ps[k], eq = qp->eq[k];
        __u64 hit = L7FP_LT(k, cnt) & L7FP_EQ(eq - ps, n) & l7fp_qname_eq(c, ps, m);
        at = L7FP_SEL(hit & (1 - found), k, at);
        found |= hit;
    }
    if (!found)
        return 0;
    at &= L7FP_QP_MASK;
    __u32 pe = qp->pe[at], eq = qp->eq[at];
    __u32 vs = eq < pe ? eq + 1 : pe, len = pe - vs, vn = m->v.len;
    switch (m->kind) {
    case L7FP_SM_PRESENT:
        return 1;
    case L7FP_SM_EXACT:
        return len == vn && l7fp_str_eq(c, vs, &m->v);
    case L7FP_SM_PREFIX:
        return len >= vn && l7fp_str_eq(c, vs, &m->v);
    case L7FP_SM_SUFFIX:
        return len >= vn && l7fp_str_eq(c, pe - vn, &m->v);
    }
    return 0;
}

/* The query matchers of route rt (after its path, method and headers
 * matched): 1 match, 0 no match, -1 undecidable (PASS). */
static __always_inline int l7fp_query_match(struct l7fp_req_ctx *c, struct l7fp_route *rt,
                                            __u32 gen)
{
#if L7FP_F_QUERY
    __u32 zero = 0;
    struct l7fp_qparse *qp = l7fp_qscan.lookup(&zero);
    if (!qp)
        return -1;
#pragma clang loop unroll(disable)
    for (__u32 j = 0; j < L7FP_MAX_QMATCH; j++) {
        __u32 qi = rt->route_id * L7FP_MAX_QMATCH + j;
        if (qi >= L7FP_N_QMATCH)
            return -1;
        __u32 idx = l7fp_idx(gen, qi, L7FP_N_QMATCH);
        struct l7fp_qmatch *m = l7fp_qmatch.lookup(&idx);
        if (!m)
            return -1;
        if (!m->kind)
            return 1;
        if (qp->bad)
            return -1;
        if (!l7fp_qparam_match(c, qp, m))
            return 0;
    }
#endif
    return 1;
}

#endif /* L7FP_QUERY_H */
