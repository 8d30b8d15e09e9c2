/* L7FP kernel decision: constants, knobs and the struct layouts of the plan
 * tables and of the decision.
 *
 * Owned by the decision engine (K1). Every struct here has a ctypes mirror in
 * fastpath/bpf_structs.py, checked against this layout by
 * tests/kernel_decide/test_layout.py: change both together.
 *
 * Every -D knob has an #ifndef default, so a program built without the
 * synthesized flags still compiles. fastpath.synth sets them per plan.
 * All structs are made of naturally aligned __u32/__u64 fields with explicit
 * padding so C and ctypes agree without packing pragmas.
 */
#ifndef L7FP_DEFS_H
#define L7FP_DEFS_H

/* ---- size knobs (powers of two where used as masks) ---- */
#ifndef L7FP_MAX_HDR
#define L7FP_MAX_HDR 512 /* head bytes looked at (power of 2); more: PASS too_large */
#endif
#ifndef L7FP_MAX_LINES
#define L7FP_MAX_LINES 32 /* request line + header lines; more: PASS */
#endif
#ifndef L7FP_MAX_HOST
#define L7FP_MAX_HOST 128 /* longest Host value the kernel decides on; more: PASS */
#endif
#ifndef L7FP_MAX_STR
#define L7FP_MAX_STR 64 /* longest match string (domain, path, header value) */
#endif
#ifndef L7FP_MAX_BLOB
#define L7FP_MAX_BLOB 256 /* reply bytes / header-add bytes per entry */
#endif
#ifndef L7FP_MAX_DOMAINS
#define L7FP_MAX_DOMAINS 16 /* domain entries scanned per listener */
#endif
#ifndef L7FP_MAX_ROUTES
#define L7FP_MAX_ROUTES 16 /* routes scanned per virtual host */
#endif
#ifndef L7FP_MAX_HMATCH
#define L7FP_MAX_HMATCH 4 /* header matchers per route */
#endif
#ifndef L7FP_MAX_WEIGHTED
#define L7FP_MAX_WEIGHTED 8 /* weighted clusters per route */
#endif
#ifndef L7FP_MAX_SLOTS
#define L7FP_MAX_SLOTS 8 /* distinct header names the plan matches on */
#endif
#ifndef L7FP_MAX_RBAC
#define L7FP_MAX_RBAC 16 /* RBAC rows (policy atoms) of a listener */
#endif
#ifndef L7FP_MAX_ABSENT
#define L7FP_MAX_ABSENT 4 /* header names that must be absent for a header-add */
#endif

/* table sizes (entries per generation; the tables hold two generations) */
#ifndef L7FP_N_LISTENERS
#define L7FP_N_LISTENERS 16
#endif
#ifndef L7FP_N_DOMAINS
#define L7FP_N_DOMAINS 64
#endif
#ifndef L7FP_N_VHOSTS
#define L7FP_N_VHOSTS 32
#endif
#ifndef L7FP_N_ROUTES
#define L7FP_N_ROUTES 64
#endif
#ifndef L7FP_N_HMATCH
#define L7FP_N_HMATCH 16
#endif
#ifndef L7FP_N_WEIGHTED
#define L7FP_N_WEIGHTED 16
#endif
#ifndef L7FP_N_CLUSTERS
#define L7FP_N_CLUSTERS 32
#endif
#ifndef L7FP_N_REPLIES
#define L7FP_N_REPLIES 16
#endif
#ifndef L7FP_N_HDRADDS
#define L7FP_N_HDRADDS 16
#endif
#ifndef L7FP_N_RBAC
#define L7FP_N_RBAC 16
#endif
#ifndef L7FP_N_BUCKETS
#define L7FP_N_BUCKETS 16
#endif

/* ---- feature knobs: 1 compiles the matcher/action in ---- */
#ifndef L7FP_F_LONG_NAMES
#define L7FP_F_LONG_NAMES 0 /* header-name keys exact up to 24 bytes (else 16) */
#endif
#ifndef L7FP_F_HDR_MATCH
#define L7FP_F_HDR_MATCH 1 /* header matchers on routes */
#endif
#ifndef L7FP_F_WEIGHTED
#define L7FP_F_WEIGHTED 1 /* weighted clusters */
#endif
#ifndef L7FP_F_RATE_LIMIT
#define L7FP_F_RATE_LIMIT 1 /* local rate limit token buckets */
#endif
#ifndef L7FP_F_FAULT
#define L7FP_F_FAULT 1 /* fault abort */
#endif
#ifndef L7FP_F_WILDCARD
#define L7FP_F_WILDCARD 1 /* suffix/prefix wildcard domains */
#endif
#ifndef L7FP_F_RBAC
#define L7FP_F_RBAC 1 /* listener RBAC in the kernel */
#endif
#ifndef L7FP_F_HDR_ADD
#define L7FP_F_HDR_ADD 1 /* request headers to add */
#endif
#ifndef L7FP_F_LEAST_REQUEST
#define L7FP_F_LEAST_REQUEST 0 /* LEAST_REQUEST picks by requests in flight (l7fp_lr_n) */
#endif
#ifndef L7FP_LR_EPS
#define L7FP_LR_EPS 64 /* in-flight counters per cluster: endpoints a LEAST_REQUEST pick weighs */
#endif

#define L7FP_HDR_MASK (L7FP_MAX_HDR - 1)
#define L7FP_BUF_SIZE (2 * L7FP_MAX_HDR + L7FP_MAX_STR + 16)
#define L7FP_BUF_MASK (2 * L7FP_MAX_HDR - 1)
#define L7FP_LINE_MASK (L7FP_MAX_LINES - 1)
#define L7FP_SLOT_MASK (L7FP_MAX_SLOTS - 1)

/* ---- verdicts of l7fp_decide ---- */
#define L7FP_FORWARD 1   /* send `consumed` bytes to (cluster, endpoint) */
#define L7FP_REPLY 2     /* answer from the kernel with reply blob `reply` */
#define L7FP_NEED_MORE 3 /* headers incomplete: cork and wait for more bytes */
#define L7FP_PASS 4      /* hand the connection to Envoy (reason says why) */

/* ---- PASS reasons (also the index of the "handed to Envoy" counters) ---- */
#define L7FP_R_NONE 0
#define L7FP_R_UNPARSED 1     /* malformed or a form we do not parse */
#define L7FP_R_CHUNKED 2      /* Transfer-Encoding present */
#define L7FP_R_UPGRADE 3      /* Upgrade header or CONNECT */
#define L7FP_R_HTTP10 4       /* HTTP/1.0 (or other version) */
#define L7FP_R_H2 5           /* HTTP/2 connection preface */
#define L7FP_R_TOO_LARGE 6    /* headers longer than L7FP_MAX_HDR or too many lines */
#define L7FP_R_PUNT_ROUTE 7   /* matched a route Envoy must serve */
#define L7FP_R_POOL_EMPTY 8   /* set by the data path: no pooled upstream socket */
#define L7FP_R_EXPECT 9       /* Expect header */
#define L7FP_R_BAD_CL 10      /* bad / duplicate / huge Content-Length */
#define L7FP_R_NO_LISTENER 11 /* listener unknown or punted as a whole */
#define L7FP_R_NO_VHOST 12    /* no virtual host: Envoy replies 404 */
#define L7FP_R_NO_ROUTE 13    /* no route matched: Envoy replies 404 */
#define L7FP_R_NO_HOST 14     /* Host missing or duplicate */
#define L7FP_R_NO_ENDPOINT 15 /* cluster without healthy endpoints */
#define L7FP_R_HDR_CONFLICT 16 /* header to set/remove is present, or duplicate matched header */
#define L7FP_R_PATH_NORM 17   /* path needs normalization Envoy would do */
#define L7FP_R_METHOD 18      /* method we do not handle (HEAD reply, odd chars) */
#define L7FP_R_LIMIT 19       /* a compiled-in table limit was hit */
#define L7FP_R_RBAC 20        /* RBAC the kernel cannot evaluate for this request */
#define L7FP_R_MAX 21

/* ---- plan table enums ---- */
#define L7FP_DOM_EXACT 1
#define L7FP_DOM_SUFFIX 2 /* "*.foo.com": stored ".foo.com", host longer than it */
#define L7FP_DOM_PREFIX 3 /* "foo.*": stored "foo.", host longer than it */
#define L7FP_DOM_ANY 4

#define L7FP_PATH_PREFIX 1
#define L7FP_PATH_EXACT 2
#define L7FP_PATH_SEP_PREFIX 3

#define L7FP_ACT_FORWARD 1
#define L7FP_ACT_REPLY 2
#define L7FP_ACT_PUNT 3

#define L7FP_SM_EXACT 1
#define L7FP_SM_PREFIX 2
#define L7FP_SM_SUFFIX 3
#define L7FP_SM_PRESENT 4

#define L7FP_LB_ROUND_ROBIN 1
#define L7FP_LB_RANDOM 2
#define L7FP_LB_LEAST_REQUEST 3 /* power of two choices (the RANDOM pick without L7FP_F_LEAST_REQUEST) */

/* flags */
#define L7FP_STR_CI 1           /* l7fp_str: compare case-insensitively */
#define L7FP_HM_INVERT 1        /* header matcher: negate */
#define L7FP_HM_ABSENT 2        /* header matcher: header must be absent */
#define L7FP_HM_MISSING_EMPTY 4 /* header matcher: missing header matches as "" */
#define L7FP_LF_PUNT 1          /* listener: every request goes to Envoy */
#define L7FP_LF_NORMALIZE 2     /* listener: Envoy normalizes paths */
#define L7FP_DF_HEAD 1          /* decision: request method is HEAD */
#define L7FP_DF_LR 2            /* decision: the endpoint is a LEAST_REQUEST pick (the data
                                 * path counts the request in flight: dp_decide_l7fp.h) */

/* A string of a plan table (domain, path, header value); bytes beyond len are
 * 0. m[k] masks the bytes of word k that belong to the string and ci is all
 * ones for a case-insensitive string (then b is lower case), so a comparison
 * needs no branch per word (the verifier's branch budget is the limit here). */
struct l7fp_str {
    __u32 len;
    __u32 flags;
    __u64 ci;
    __u64 m[L7FP_MAX_STR / 8];
    __u8 b[L7FP_MAX_STR];
};

struct l7fp_listener {
    __u32 flags;
    __u32 dom_base; /* first entry in l7fp_domains */
    __u32 n_dom;
    __u32 bucket;  /* listener rate limit: bucket index + 1, 0 = none */
    __u32 nomatch; /* no vhost / no route: reply blob index + 1 (Envoy's 404), 0 = PASS */
    __u32 order;   /* policy filters in HCM order: L7FP_FILT_* per 4 bits, low first */
    __u32 fault_status; /* HCM-level fault abort (requests without a route) */
    __u32 fault_per_million;
    __u32 fault_reply;
    __u32 rbac_base; /* RBAC rows in l7fp_rbac */
    __u32 rbac_n;
    __u32 rbac_deny; /* bit f set: RBAC filter f is a DENY set (else ALLOW) */
    __u32 rbac_reply; /* the 403 blob */
    __u32 rbac_nf;    /* RBAC filters (0..L7FP_MAX_RBAC_FILTERS), rows in filter order */
    __u32 trace;      /* HCM tracing: 0 none, else sampling + 1 (of 10000) | 0x10000 Zipkin (dp_xrid.h) */
};

#define L7FP_FILT_RATE_LIMIT 1
#define L7FP_FILT_FAULT 2
#define L7FP_FILT_RBAC 3  /* the first RBAC filter; the second is L7FP_FILT_RBAC + 1 */
#define L7FP_MAX_RBAC_FILTERS 2
#define L7FP_MAX_FILTERS 4

struct l7fp_domain {
    __u32 kind;
    __u32 vhost;
    struct l7fp_str s;
};

struct l7fp_vhost {
    __u32 route_base;
    __u32 n_routes;
};

struct l7fp_route {
    __u32 route_id; /* plan-global index for counters */
    __u32 path_kind;
    __u32 n_hm; /* header matchers at hm_base */
    __u32 hm_base;
    __u64 method; /* method bytes, little-endian, 0 = any */
    __u32 method_len;
    __u32 action;
    __u32 cluster;  /* single cluster id, or first l7fp_weighted entry */
    __u32 n_wc;     /* 0: single cluster; else weighted entries */
    __u32 total_weight;
    __u32 status;   /* REPLY status */
    __u32 reply;    /* REPLY blob index */
    __u32 hdr_add;  /* header-add blob index + 1, 0 = none */
    __u32 bucket;   /* rate-limit bucket index + 1, 0 = none */
    __u32 fault_status;
    __u32 fault_per_million; /* 0 = no fault */
    __u32 fault_reply;
    struct l7fp_str path;
};

struct l7fp_hmatch {
    __u32 slot; /* header-name slot (l7fp_hnames) */
    __u32 kind; /* L7FP_SM_* */
    __u32 flags;
    __u32 pad;
    struct l7fp_str v;
};

/* One atom of a listener's RBAC, in policy order: policy -> permissions side
 * then principals side -> OR-groups -> AND-items -> fields. `ends` closes the
 * levels after this atom (L7FP_RB_*). */
struct l7fp_rbac_row {
    __u32 kind; /* L7FP_RK_* */
    __u32 ends;
    __u64 method; /* L7FP_RK_METHOD: method word */
    __u32 method_len;
    __u32 pad;
    struct l7fp_hmatch m; /* L7FP_RK_HEADER: the matcher; L7FP_RK_PATH: m.kind + m.v */
};

#define L7FP_RK_TRUE 1
#define L7FP_RK_FALSE 2
#define L7FP_RK_PATH 3
#define L7FP_RK_METHOD 4
#define L7FP_RK_HEADER 5
#define L7FP_RK_SRC_CIDR 6 /* method: address, method_len: mask (both network order) */

#define L7FP_RB_ITEM 1      /* end of a permission/principal: apply its invert */
#define L7FP_RB_GROUP 2     /* end of an AND-group */
#define L7FP_RB_SIDE 4      /* end of the permissions (or principals) of a policy */
#define L7FP_RB_INVERT 8    /* the permission/principal is inverted */
#define L7FP_RB_PRIN 16     /* the row belongs to the principals side */
#define L7FP_RB_FILTER 32   /* last row of an RBAC filter (Istio: DENY then ALLOW) */

struct l7fp_weighted {
    __u32 cluster;
    __u32 cum_weight; /* running sum including this entry */
};

struct l7fp_cluster {
    __u32 lb;
    __u32 n_endpoints; /* healthy endpoints, indices 0..n-1 */
};

/* Key of the header-name table: length, the name's first and last 8 bytes and,
 * with L7FP_F_LONG_NAMES, up to 8 bytes from byte 8 on (lower case). Exact for
 * names of at most 16 (24) bytes; longer ones only key must-be-absent checks. */
struct l7fp_hname_key {
    __u32 len;
    __u32 pad;
    __u64 w0;
    __u64 w1;
    __u64 w2;
};

/* Reply bytes (a whole HTTP response) or header-add bytes ("n: v\r\n"...). */
struct l7fp_blob {
    __u32 len;
    __u32 n_absent;                    /* header-add: slots that must be absent */
    __u32 absent[L7FP_MAX_ABSENT];     /* their slots */
    __u8 b[L7FP_MAX_BLOB];
};

/* Token bucket config (from the plan) and state (kernel-owned). */
struct l7fp_bucket {
    __u64 max_tokens;
    __u64 tokens_per_fill;
    __u64 fill_interval_ns;
    __u32 status;
    __u32 reply;
    __u32 enforce_per_million;
    __u32 pad;
    __u64 tokens;  /* state */
    __u64 last_ns; /* state: time of the last fill, 0 = never (starts full) */
};

/* What l7fp_decide tells its caller (the sk_msg program, or the test harness). */
struct l7fp_decision {
    __u32 verdict;   /* L7FP_FORWARD / REPLY / NEED_MORE / PASS */
    __u32 reason;    /* PASS reason */
    __u32 consumed;  /* header bytes + Content-Length */
    __u32 hdr_len;   /* bytes up to and including the blank line */
    __u32 body_len;  /* Content-Length */
    __u32 vhost;     /* virtual host index, or ~0 */
    __u32 route;     /* route_id of the matched route, or ~0 */
    __u32 cluster;   /* FORWARD: cluster id */
    __u32 endpoint;  /* FORWARD: endpoint index */
    __u32 hdr_add;   /* header-add blob index + 1, 0 = none (insert at hdr_len - 2) */
    __u32 status;    /* REPLY: HTTP status */
    __u32 reply;     /* REPLY: blob index in l7fp_replies */
    __u32 flags;     /* L7FP_DF_* */
    __u32 gen;       /* plan generation the decision used */
};

/* Parsed request: filled by the parser, read by the matchers. */
struct l7fp_req {
    __u32 len;       /* bytes copied into buf */
    __u32 data_len;  /* bytes available in the message */
    __u32 hdr_len;
    __u32 nlines;
    __u32 bad;       /* PASS reason found while scanning, 0 = none */
    __u32 cur_start; /* scanner state */
    __u32 cur_colon;
    __u32 sp1, sp2, q;
    __u32 tflags;    /* request-target flags (L7FP_TF_*) */
    __u32 method_len;
    __u64 method;
    __u32 path_off, path_len;
    __u32 host_off, host_len;
    __u32 cl;
    __u32 seen; /* L7FP_SEEN_* */
    __u32 rb_item, rb_group, rb_side, rb_perm, rb_hit, rb_bad, rb_deny, rb_hits; /* RBAC state */
    __u32 slot_off[L7FP_MAX_SLOTS];
    __u32 slot_len[L7FP_MAX_SLOTS]; /* value length + 1; 0 = absent */
    __u16 ls[L7FP_MAX_LINES];       /* line start */
    __u16 le[L7FP_MAX_LINES];       /* line end (the '\r') */
    __u16 lc[L7FP_MAX_LINES];       /* first ':' or 0 */
};

/* Per-CPU scratch given to l7fp_decide by its caller. The first six fields
 * are inputs (src_ip4 optional): the data path sets rand/rand2/rand3 from bpf_get_prandom_u32(), now_ns
 * from bpf_ktime_get_ns() and gen from its active plan generation; the test
 * harness sets fixed values so a decision is reproducible. */
struct l7fp_req_ctx {
    __u32 rand;    /* input: weighted cluster choice, fault abort */
    __u32 rand2;   /* input: endpoint choice (RANDOM lb) */
    __u32 gen;     /* input: plan generation 0 or 1 (tables hold both) */
    __u32 src_ip4; /* input: client address, network order; 0 = unknown (RBAC
                    * source-CIDR rules then hand the request to Envoy) */
    __u64 now_ns;  /* input: clock for token buckets */
    __u32 rand3;   /* input: LEAST_REQUEST's second draw (the first is rand2) */
    __u32 _pad;
    struct l7fp_req r;
    __u8 buf[L7FP_BUF_SIZE];
};

/* Byte classes (struct l7fp_cclass, filled by fastpath.synth). A zeroed
 * table makes every byte invalid, so a missing table means PASS, never a
 * wrong decision. */
#define L7FP_C_TCHAR 0  /* RFC 9110 tchar (header names) */
#define L7FP_C_VALUE 1  /* allowed in a header value: HT, SP, VCHAR, obs-text */
#define L7FP_C_TARGET 2 /* allowed in the target unescaped (the reference's safe set) */
#define L7FP_C_UPPER 3  /* 'A'..'Z' (methods) */
#define L7FP_C_SP 4     /* ' ' */
#define L7FP_C_COLON 5  /* ':' */
#define L7FP_C_QMARK 6  /* '?' */
#define L7FP_C_PCT 7    /* '%' or '\\' in a path: normalization matters */

struct l7fp_cclass {
    __u8 c[256];
};

#define L7FP_TF_PCT 1    /* '%' in the path */
#define L7FP_TF_DOTSEG 2 /* "//", "/./", "/../" or a final "/." "/.." in the path */
#define L7FP_TF_ENVOY_HDR 4 /* an x-envoy-* or x-forwarded-client-cert header: Envoy's (L7FP_R_HDR_CONFLICT) */

#define L7FP_SEEN_HOST 1
#define L7FP_SEEN_CL 2

#endif /* L7FP_DEFS_H */
