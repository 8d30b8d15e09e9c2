/* Matchers of the kernel plan: strings, domains (virtual host choice), routes.
 *
 * Owned by the decision engine (K1); called only by l7fp_decide
 * (l7fp_decide.h). Semantics follow Envoy as the KernelPlan documents them
 * (fastpath/plan.py); the reference model fastpath/reference.py is the oracle
 * the differential tests compare against.
 */
#ifndef L7FP_MATCH_H
#define L7FP_MATCH_H

#include "l7fp_dfa.h"
#include "l7fp_http.h"

/* buf[off, off + s->len) equals s (case-insensitive if s has L7FP_STR_CI;
 * table strings are stored lower case then). Branch-free over all words: the
 * masks in s select the string's bytes. */
static __always_inline int l7fp_str_eq(struct l7fp_req_ctx *c, __u32 off, struct l7fp_str *s)
{
    __u64 diff = 0, hi = 0x8080808080808080ULL;
#pragma unroll
    for (__u32 k = 0; k < L7FP_MAX_STR / 8; k++) {
        __u64 x = l7fp_load64(c, off + k * 8);
        __u64 lo = ((x | hi) - 0x4141414141414141ULL) & ~((x | hi) - 0x5b5b5b5b5b5b5b5bULL) &
                   ~x & hi;
        x |= (lo >> 2) & s->ci;
        diff |= (x & s->m[k]) ^ *(__u64 *)(s->b + k * 8);
    }
    return diff == 0;
}

/* Host [off, off+len) against one domain entry (Envoy's domain forms). */
static __always_inline int l7fp_domain_match(struct l7fp_req_ctx *c, struct l7fp_domain *d,
                                             __u32 off, __u32 len)
{
    __u32 n = d->s.len;
    switch (d->kind) {
    case L7FP_DOM_EXACT:
        return len == n && l7fp_str_eq(c, off, &d->s);
#if L7FP_F_WILDCARD
    case L7FP_DOM_SUFFIX:
        return len > n && l7fp_str_eq(c, off + len - n, &d->s);
    case L7FP_DOM_PREFIX:
        return len > n && l7fp_str_eq(c, off, &d->s);
#endif
    case L7FP_DOM_ANY:
        return 1;
    }
    return 0;
}

/* Virtual host for the Host header: the first matching domain entry of the
 * listener (the synthesis orders them exact, suffix longest first, prefix
 * longest first, "*"). Returns the vhost index or -1; -2 when a limit is hit. */
static __always_inline int l7fp_pick_vhost(struct l7fp_req_ctx *c, struct l7fp_listener *l,
                                           __u32 gen)
{
    __u32 off = c->r.host_off, len = c->r.host_len;
    if (l->n_dom > L7FP_MAX_DOMAINS)
        return -2;
    for (__u32 i = 0; i < L7FP_MAX_DOMAINS; i++) {
        if (i >= l->n_dom)
            break;
        __u32 di = l->dom_base + i;
        if (di >= L7FP_N_DOMAINS)
            return -2;
        __u32 idx = l7fp_idx(gen, di, L7FP_N_DOMAINS);
        struct l7fp_domain *d = l7fp_domains.lookup(&idx);
        if (!d)
            return -2;
        if (l7fp_domain_match(c, d, off, len))
            return d->vhost;
    }
    return -1;
}

/* Envoy HeaderMatcher over the recorded slot value. 1 match, 0 no match,
 * -1 undecidable here (duplicate header: Envoy joins the values). */
static __always_inline int l7fp_header_match(struct l7fp_req_ctx *c, struct l7fp_hmatch *m)
{
    __u32 s = m->slot & L7FP_SLOT_MASK;
    __u32 vl = c->r.slot_len[s];
    int invert = (m->flags & L7FP_HM_INVERT) != 0;
    int present_wanted = (m->flags & L7FP_HM_ABSENT) == 0;
    if (vl == 0xffffffff)
        return -1;
    if (vl == 0 && !(m->flags & L7FP_HM_MISSING_EMPTY)) {
        /* Envoy: an absent header only matches a present_match matcher */
        if (m->kind != L7FP_SM_PRESENT)
            return 0;
        return invert ? present_wanted : !present_wanted;
    }
    __u32 len = vl ? vl - 1 : 0, off = c->r.slot_off[s], n = m->v.len;
    int r = 0;
    switch (m->kind) {
    case L7FP_SM_PRESENT:
        r = present_wanted;
        break;
    case L7FP_SM_EXACT:
        r = len == n && l7fp_str_eq(c, off, &m->v);
        break;
    case L7FP_SM_PREFIX:
        r = len >= n && l7fp_str_eq(c, off, &m->v);
        break;
    case L7FP_SM_SUFFIX:
        r = len >= n && l7fp_str_eq(c, off + len - n, &m->v);
        break;
#if L7FP_F_DFA
    case L7FP_SM_DFA: /* contains / safe_regex: a full match of the value */
        r = l7fp_dfa_match(c, n, off, len);
        if (r < 0)
            return -1;
        break;
#endif
    }
    return r ^ invert;
}

/* All header matchers of a route. 1, 0, or -1 (undecidable: PASS). */
static __always_inline int l7fp_headers_match(struct l7fp_req_ctx *c, struct l7fp_route *rt,
                                              __u32 gen)
{
#if L7FP_F_HDR_MATCH
    if (rt->n_hm > L7FP_MAX_HMATCH)
        return -1;
    for (__u32 j = 0; j < L7FP_MAX_HMATCH; j++) {
        if (j >= rt->n_hm)
            break;
        __u32 hi = rt->hm_base + j;
        if (hi >= L7FP_N_HMATCH)
            return -1;
        __u32 idx = l7fp_idx(gen, hi, L7FP_N_HMATCH);
        struct l7fp_hmatch *m = l7fp_hmatch.lookup(&idx);
        if (!m)
            return -1;
        int r = l7fp_header_match(c, m);
        if (r != 1)
            return r;
    }
    return 1;
#else
    return rt->n_hm ? -1 : 1;
#endif
}

/* Path matcher of a route, over the path without the query (as the reference
 * model, fastpath.reference.route_matches). 1, 0, or -1 (undecidable: PASS). */
static __always_inline int l7fp_path_match(struct l7fp_req_ctx *c, struct l7fp_route *rt)
{
    struct l7fp_req *r = &c->r;
    __u32 n = rt->path.len, off = r->path_off;
    switch (rt->path_kind) {
    case L7FP_PATH_PREFIX:
        return r->path_len >= n && l7fp_str_eq(c, off, &rt->path);
    case L7FP_PATH_EXACT:
        return r->path_len == n && l7fp_str_eq(c, off, &rt->path);
    case L7FP_PATH_SEP_PREFIX:
        if (r->path_len < n || !l7fp_str_eq(c, off, &rt->path))
            return 0;
        return r->path_len == n || l7fp_byte(c, off + n) == '/';
#if L7FP_F_DFA
    case L7FP_PATH_DFA: /* safe_regex: full match of the path without the query */
        return l7fp_dfa_match(c, n, off, r->path_len);
#endif
    }
    return 0;
}

/* Route rt against the request: 1 match, 0 no match, -1 undecidable (PASS). */
static __always_inline int l7fp_route_match(struct l7fp_req_ctx *c, struct l7fp_route *rt,
                                            __u32 gen)
{
    if (rt->method_len &&
        (rt->method_len != c->r.method_len || rt->method != c->r.method))
        return 0;
    int pm = l7fp_path_match(c, rt);
    if (pm != 1)
        return pm;
    if (rt->n_hm)
        return l7fp_headers_match(c, rt, gen);
    return 1;
}

#endif /* L7FP_MATCH_H */
