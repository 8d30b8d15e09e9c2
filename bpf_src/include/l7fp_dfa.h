/* DFA walker of the kernel decision: path regexes, header `contains` and
 * `safe_regex` matchers.
 *
 * Owned by the decision engine (K1); called by the matchers in l7fp_match.h
 * only when the plan compiles L7FP_F_DFA in. The automata come from
 * fastpath.regex_dfa via fastpath.synth_dfa (one table entry per DFA, two
 * generations). The walk runs in a bpf_loop callback, so the verifier checks
 * one step once instead of one step per head byte at every call site. BCC
 * 0.26 neither relocates the callback's address nor emits the func_info the
 * verifier wants for it: programs that inline l7fp_dfa_match are loaded by
 * fastpath.bpf_callback.load_with_callback.
 *
 * The callback keeps its state in a per-CPU map, not in its arguments: BCC
 * rewrites the arguments of every non-static function as kprobe registers.
 */
#ifndef L7FP_DFA_H
#define L7FP_DFA_H

#include "l7fp_http.h"

#ifndef L7FP_F_DFA
#define L7FP_F_DFA 0
#endif
#ifndef L7FP_N_DFAS
#define L7FP_N_DFAS 4 /* DFA table entries per generation */
#endif
#define L7FP_DFA_STATES 64  /* fastpath.regex_dfa.MAX_STATES */
#define L7FP_DFA_CLASSES 32 /* byte classes per DFA (fastpath.synth_dfa) */
#define L7FP_DFA_DEAD 0xff  /* next state: no match whatever follows */
#define L7FP_DFA_UNDECIDED 0x100 /* walk state: a byte outside the DFA's alphabet */
#define L7FP_PATH_DFA 4     /* route path_kind: path.len is the DFA index */
#define L7FP_SM_DFA 5       /* header matcher kind: v.len is the DFA index */

/* One automaton: cls[b] is the column of byte b (>= L7FP_DFA_CLASSES: the
 * request goes to Envoy); next[s * L7FP_DFA_CLASSES + cls] the next state;
 * bit s of accept says state s accepts. Start state 0. */
struct l7fp_dfa {
    __u64 accept;
    __u8 cls[256];
    __u8 next[L7FP_DFA_STATES * L7FP_DFA_CLASSES];
};

/* The walk in progress (per CPU): bytes [off, end) of the scratch buffer. */
struct l7fp_dfa_walk {
    __u32 off;
    __u32 end;
    __u32 state;
    __u32 dfa; /* table index, generation included */
};

#if L7FP_F_DFA
BPF_ARRAY(l7fp_dfas, struct l7fp_dfa, 2 * L7FP_N_DFAS);
BPF_PERCPU_ARRAY(l7fp_dfa_walks, struct l7fp_dfa_walk, 1);

/* One byte of the walk (the bpf_loop callback): 1 stops the loop. */
long l7fp_dfa_step(void *unused)
{
    __u32 zero = 0;
    struct l7fp_dfa_walk *w = l7fp_dfa_walks.lookup(&zero);
    struct l7fp_req_ctx *c = l7fp_scratch.lookup(&zero);
    if (!w)
        return 1;
    __u32 di = w->dfa;
    struct l7fp_dfa *d = l7fp_dfas.lookup(&di);
    if (!c || !d || w->off >= w->end) {
        w->state = L7FP_DFA_UNDECIDED;
        return 1;
    }
    __u32 cl = d->cls[l7fp_byte(c, w->off)];
    w->off++;
    if (cl >= L7FP_DFA_CLASSES) {
        w->state = L7FP_DFA_UNDECIDED;
        return 1;
    }
    __u32 nx = d->next[(w->state & (L7FP_DFA_STATES - 1)) * L7FP_DFA_CLASSES + cl];
    w->state = nx;
    return nx >= L7FP_DFA_STATES ? 1 : 0;
}

/* Full match of DFA `dfa` (this generation) over bytes [off, off + len):
 * 1 match, 0 no match, -1 undecidable here (PASS). */
static __always_inline int l7fp_dfa_match(struct l7fp_req_ctx *c, __u32 dfa, __u32 off, __u32 len)
{
    __u32 zero = 0;
    struct l7fp_dfa_walk *w = l7fp_dfa_walks.lookup(&zero);
    if (!w || dfa >= L7FP_N_DFAS || len > L7FP_MAX_HDR)
        return -1;
    __u32 idx = l7fp_idx(c->gen, dfa, L7FP_N_DFAS);
    struct l7fp_dfa *d = l7fp_dfas.lookup(&idx);
    if (!d)
        return -1;
    w->off = off;
    w->end = off + len;
    w->state = 0;
    w->dfa = idx;
    bpf_loop(len, l7fp_dfa_step, 0, 0);
    __u32 s = w->state;
    if (s == L7FP_DFA_UNDECIDED)
        return -1;
    if (s >= L7FP_DFA_STATES)
        return 0;
    return (d->accept >> s) & 1;
}
#endif /* L7FP_F_DFA */

#endif /* L7FP_DFA_H */
