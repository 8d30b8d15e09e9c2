/* Listener RBAC in the kernel: Envoy's policy semantics over l7fp_rbac rows.
 *
 * Owned by the decision engine (K1); called by l7fp_filters (l7fp_decide.h)
 * when the listener's HCM order reaches its RBAC filter. A policy matches when
 * any permission group and any principal group match; a group is the AND of
 * its items, an item the AND of its fields, inverted if it says so. The synthesis
 * writes the rows in that nesting with `ends` marking where each level closes.
 * The running values live in the scratch (l7fp_req.rb_*), so the row loop
 * costs the verifier one state per row.
 */
#ifndef L7FP_RBAC_H
#define L7FP_RBAC_H

#include "l7fp_match.h"

/* One atom: 1 true, 0 false, -1 undecidable here (PASS). */
static __always_inline int l7fp_rbac_atom(struct l7fp_req_ctx *c, struct l7fp_rbac_row *row)
{
    struct l7fp_req *r = &c->r;
    __u32 n = row->m.v.len;
    switch (row->kind) {
    case L7FP_RK_TRUE:
        return 1;
    case L7FP_RK_METHOD:
        return row->method_len == r->method_len && row->method == r->method;
    case L7FP_RK_PATH:
        switch (row->m.kind) {
        case L7FP_SM_EXACT:
            return r->path_len == n && l7fp_str_eq(c, r->path_off, &row->m.v);
        case L7FP_SM_PREFIX:
            return r->path_len >= n && l7fp_str_eq(c, r->path_off, &row->m.v);
        case L7FP_SM_SUFFIX:
            return r->path_len >= n && l7fp_str_eq(c, r->path_off + r->path_len - n, &row->m.v);
        case L7FP_SM_PRESENT:
            return 1;
#if L7FP_F_DFA
        case L7FP_SM_DFA: /* url_path contains / safe_regex: full match of the path */
            return l7fp_dfa_match(c, n, r->path_off, r->path_len);
#endif
        }
        return -1;
    case L7FP_RK_HEADER:
        return l7fp_header_match(c, &row->m);
    case L7FP_RK_SRC_CIDR:
        if (!c->src_ip4)
            return -1; /* the caller did not say who is asking */
        return ((c->src_ip4 ^ (__u32)row->method) & row->method_len) == 0;
    }
    return 0; /* L7FP_RK_FALSE */
}

/* Folds one atom into the running values (all 0/1, kept in the scratch).
 * The rows of the second RBAC filter follow the first's. */
static __always_inline void l7fp_rbac_fold(struct l7fp_req *r, __u32 v, __u32 ends)
{
    __u32 item = r->rb_item & v;
    if (ends & L7FP_RB_ITEM) {
        r->rb_group &= item ^ ((ends & L7FP_RB_INVERT) ? 1 : 0);
        item = 1;
    }
    r->rb_item = item;
    if (ends & L7FP_RB_GROUP) {
        r->rb_side |= r->rb_group;
        r->rb_group = 1;
    }
    if (ends & L7FP_RB_SIDE) {
        if (ends & L7FP_RB_PRIN)
            r->rb_hit |= r->rb_perm & r->rb_side;
        else
            r->rb_perm = r->rb_side;
        r->rb_side = 0;
    }
    if (ends & L7FP_RB_FILTER) { /* rb_hits: bit 2f = filter f done, bit 2f+1 = its hit */
        __u32 f = (r->rb_hits & 1) ? 1 : 0;
        r->rb_hits |= (1 | (r->rb_hit << 1)) << (2 * f);
        r->rb_hit = 0;
    }
}

/* Every RBAC filter of the listener at once: bit f set when filter f denies;
 * -1 when undecidable here (PASS). */
static __always_inline int l7fp_rbac_denies(struct l7fp_req_ctx *c, struct l7fp_listener *l,
                                            __u32 gen)
{
#if L7FP_F_RBAC
    struct l7fp_req *r = &c->r;
    if (l->rbac_n > L7FP_MAX_RBAC || l->rbac_nf > L7FP_MAX_RBAC_FILTERS)
        return -1;
    r->rb_item = r->rb_group = 1;
    r->rb_side = r->rb_perm = r->rb_hit = r->rb_bad = r->rb_hits = 0;
    for (__u32 i = 0; i < L7FP_MAX_RBAC; i++) {
        L7FP_BARRIER();
        if (i >= l->rbac_n || r->rb_bad)
            break;
        __u32 ri = l->rbac_base + i;
        __u32 idx = l7fp_idx(gen, ri, L7FP_N_RBAC);
        struct l7fp_rbac_row *row = ri < L7FP_N_RBAC ? l7fp_rbac.lookup(&idx) : NULL;
        if (!row) {
            r->rb_bad = 1;
            break;
        }
        int v = l7fp_rbac_atom(c, row);
        if (v < 0)
            r->rb_bad = 1;
        else
            l7fp_rbac_fold(r, v, row->ends);
    }
    L7FP_BARRIER();
    if (r->rb_bad)
        return -1;
    __u32 hits = r->rb_hits, deny = 0;
#pragma unroll
    for (int f = 0; f < L7FP_MAX_RBAC_FILTERS; f++) {
        __u32 hit = (hits >> (2 * f + 1)) & 1;
        __u32 is_deny = (l->rbac_deny >> f) & 1;
        if (f < l->rbac_nf && (is_deny ? hit : !hit))
            deny |= 1 << f;
    }
    return deny;
#else
    return l->rbac_n ? -1 : 0;
#endif
}

#endif /* L7FP_RBAC_H */
