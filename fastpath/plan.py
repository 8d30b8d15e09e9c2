"""KernelPlan: the typed IR of the policy the kernel fast path enforces.

Owned by `fastpath.plan`. Built only by `fastpath.split.split_snapshot` from one
node's Envoy resources; read by the reference model (`fastpath.reference`), the
C synthesis and the BCC agent (`fastpath.synth`, `fastpath.agent`). Every class
is a frozen dataclass made of tuples, strings, ints and enums, so a plan is
hashable, comparable and safe to share between threads.

Stability rule: fields are only ever *added*, with defaults. Nothing here is
renamed or removed once committed (the kernel engineers build on it).

Semantics the readers rely on (they mirror Envoy's, see docs/split.md):

* Listener selection: by (address, port); "0.0.0.0" matches any address.
* Virtual host selection (Envoy order): exact domain, then suffix wildcards
  ("*.foo.com", longest first), then prefix wildcards ("foo.*", longest first),
  then "*". The Host header is compared as sent, ``:port`` included (Envoy's
  default; checked by tests/split against Envoy 1.40), case-insensitively.
* Routes: first match wins, in plan order. A route whose verdict is ENVOY is a
  *punt* entry: the kernel stops at it and hands the request to Envoy, so a later
  KERNEL route never takes a request Envoy would have given to an earlier one.
* Policy filters run after route selection and before the action, in
  ``ListenerPlan.filter_order`` (the HCM's http_filters order), also when no
  route or virtual host matches (then 404 after them).
* RBAC (listener level): a DENY policy that matches, or an ALLOW policy set
  none of whose policies matches, rejects with 403 "RBAC: access denied". If
  ``Rbac.verdict`` is ENVOY the kernel hands every request of that listener to
  Envoy (rule 4 of DESIGN.md: a deny is never bypassed).
* Fault abort: ``Route.fault_abort`` (or ``ListenerPlan.fault_abort`` when no
  route matches) replies ``status`` with body "fault filter abort".
* Fault delay: ``Route.fault_delay`` holds ``per_million`` of a KERNEL route's
  requests ``delay_ms`` before they are sent upstream (Envoy's fault filter:
  sampled at the fault filter's place in ``filter_order``, the router and its
  timer start after the delay). The kernel samples only requests it forwards
  itself; a request it hands to Envoy is sampled there (the residual keeps the
  filter), so each request is delayed with the configured probability once.
* Local rate limit: a token bucket per listener (``ListenerPlan.local_rate_limit``)
  or per route (``Route.rate_limit``); the owner of the bucket is the kernel
  exactly when the route's verdict is KERNEL (the residual removes it from
  Envoy's config then, see ``fastpath.residual``). An empty bucket replies
  ``status`` (429) with body "local_rate_limited". A route's bucket replaces
  the listener's for that route.
* ``fastpath.reference.decide`` is the executable form of all of the above.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from fastpath.outlier import OutlierConfig


class Verdict(enum.Enum):
    """Who enforces a route (or an RBAC set): the kernel, or Envoy (punt)."""

    KERNEL = "KERNEL"
    ENVOY = "ENVOY"


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class PathKind(enum.Enum):
    """How a route matches the path (Envoy RouteMatch.path_specifier)."""

    PREFIX = "prefix"
    EXACT = "exact"  # Envoy `path`
    PATH_SEPARATED_PREFIX = "path_separated_prefix"
    REGEX = "regex"  # Envoy `safe_regex`, RE2 full match on the path (no query)
    # A regex the split proved equivalent to a literal or to a prefix keeps
    # kind REGEX here, with RouteMatch.regex_literal / regex_prefix filled in.


class StringKind(enum.Enum):
    """A StringMatcher (header value, query parameter value, RBAC path)."""

    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "regex"
    PRESENT = "present"  # present_match: true


@dataclass(frozen=True)
class StringMatch:
    """Match on a string value. ``ignore_case`` follows Envoy's StringMatcher."""

    kind: StringKind
    value: str = ""
    ignore_case: bool = False


@dataclass(frozen=True)
class HeaderMatch:
    """One entry of RouteMatch.headers (Envoy HeaderMatcher).

    ``match`` is None for a bare "name present" matcher. ``invert`` negates the
    result; ``absent`` means "the header is not present" (present_match: false).
    Header names are lower case (HTTP/1 names are case-insensitive).
    ``evaluable`` is False when `fastpath.classify_match` found a part the
    kernel cannot evaluate as Envoy does (its reason is on the route): a
    punt entry leaves this conjunct out (`synth_tables.punt_match`).
    """

    name: str
    match: StringMatch | None = None
    invert: bool = False
    absent: bool = False
    treat_missing_as_empty: bool = False
    evaluable: bool = True


@dataclass(frozen=True)
class QueryParamMatch:
    """One entry of RouteMatch.query_parameters; ``match`` None means present.
    ``evaluable``: as HeaderMatch's."""

    name: str
    match: StringMatch | None = None
    evaluable: bool = True


@dataclass(frozen=True)
class RegexDfa:
    """A full-match DFA over ASCII bytes (built by `fastpath.regex_dfa`).

    ``classes[b]`` is the column of byte ``b`` (0..127); the next state of
    ``s`` on byte ``b`` is ``transitions[s * n_classes + classes[b]]``, -1 is
    the dead state (no match). The start state is 0; the path matches when the
    walk over all its bytes ends in a state with ``accepting[state]``. A byte
    >= 128 means: hand the request to Envoy.
    """

    classes: tuple[int, ...]
    n_classes: int
    transitions: tuple[int, ...]
    accepting: tuple[bool, ...]


@dataclass(frozen=True)
class RouteMatch:
    """The matcher of one route. All parts must match (AND).

    ``method`` is a shortcut for a ``:method`` exact header match (kept also in
    ``headers`` when it came from there). ``case_sensitive`` applies to the path
    for PREFIX/EXACT/PATH_SEPARATED_PREFIX (Envoy's default: True).
    """

    path_kind: PathKind
    path: str
    case_sensitive: bool = True
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryParamMatch, ...] = ()
    method: str | None = None
    regex_literal: str | None = None  # REGEX proven equal to an exact path
    regex_prefix: str | None = None  # REGEX proven equal to a prefix ("^/a/.*")
    grpc: bool = False  # RouteMatch.grpc: content-type application/grpc*
    regex_dfa: RegexDfa | None = None  # REGEX that is neither literal nor prefix, as a DFA
    # Envoy match fields the IR does not hold (runtime_fraction, tls_context,
    # ...; the route is ENVOY): Envoy may skip a request all the rest matches
    unmodelled: tuple[str, ...] = ()

    def literal_path(self) -> tuple[str, str] | None:
        """("exact"|"prefix", path) for a case-sensitive literal path matcher
        (as fastpath.reference.route_matches reads it): every path it takes is
        that path, or starts with it. A path-separated prefix counts as its
        plain prefix (a superset: callers that need the exact set check the
        kind). None for a DFA, a true regex or a case-insensitive path. Read
        by fastpath.rewrite and fastpath.inbound_verdict."""
        if not self.case_sensitive:
            return None
        if self.path_kind is PathKind.EXACT:
            return "exact", self.path
        if self.path_kind in (PathKind.PREFIX, PathKind.PATH_SEPARATED_PREFIX):
            return "prefix", self.path
        if self.path_kind is PathKind.REGEX and self.regex_literal is not None:
            return "exact", self.regex_literal
        if self.path_kind is PathKind.REGEX and self.regex_prefix is not None:
            return "prefix", self.regex_prefix
        return None


@dataclass(frozen=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True)
class RetryPolicy:
    """Envoy RetryPolicy of a route, as far as it can fire on the kernel path.

    Filled by `fastpath.classify_route` for every route with a retry policy;
    executed by the data path (bpf_src/sk_msg.c arms a copy of the request,
    fastpath/retry*.py re-sends it) when the route is KERNEL. Semantics (Envoy's):
    a response whose status is in ``status_codes`` (retriable-status-codes,
    retriable-4xx = 409, gateway-error = 502-504, 5xx = the class 5) or whose head carries a ``grpc-status`` in ``grpc_codes`` is retried, at most
    ``num_retries`` times, after a jittered backoff (``base_ms``, ``max_ms``),
    on another endpoint of the same cluster when ``previous_hosts`` can find
    one (within ``host_selection_attempts`` picks), unless the response
    carries ``x-envoy-ratelimited`` (``x-envoy-overloaded`` from an app never
    reaches the client's Envoy: the destination's sidecar drops it). The cluster's max_retries circuit breaker
    bounds concurrent retries.
    """

    num_retries: int = 1
    retry_on: tuple[str, ...] = ()
    status_codes: tuple[int, ...] = ()  # statuses that are retried; 5: any 5xx (retry_on 5xx)
    grpc_codes: tuple[int, ...] = ()  # grpc-status values that are retried
    previous_hosts: bool = False
    host_selection_attempts: int = 1
    base_ms: int = 25
    max_ms: int = 250
    per_try_timeout_ms: int | None = None  # each attempt's timer until its response starts


@dataclass(frozen=True)
class MirrorPolicy:
    """One of a route's request_mirror_policies (Envoy's shadowing): a sampled
    copy of the request goes, fire-and-forget, to ``cluster``; its Host gets
    ``-shadow`` appended unless ``host_suffix`` is False
    (disable_shadow_host_suffix_append). The client's answer never depends on it.

    With ``cluster_header`` (``cluster`` is then ""), the cluster is the first
    value of that request header (as forwarded, after the route's header adds):
    no header, an empty value or a name that is no cluster of the node sends no
    shadow (Envoy 1.40, fastpath.mirror.header_cluster)."""

    cluster: str
    per_million: int = 1_000_000  # runtime_fraction.default_value (absent: every request)
    host_suffix: bool = True
    cluster_header: str = ""  # lower case; set: the cluster is named per request


@dataclass(frozen=True)
class PathRewrite:
    """A route's ``regex_rewrite`` in the one form the kernel produces exactly
    (fastpath.rewrite builds it; docs/split.md "Regex path rewrites"): the first
    ``cut`` bytes of the path (``None``: the whole path, up to the ``?``) are
    replaced by ``value``; the query string is kept as is. A path that does
    not start with ``check`` is left as is (the route's matcher does not
    guarantee the pattern's literal: the kernel compares). Envoy 1.40 also
    sends ``x-envoy-original-path: <the request's path and query>`` as the
    last header line, and replaces a client's header of that name in place
    (the kernel hands such a request to Envoy). ``pattern`` and
    ``substitution`` are the route's, for --explain."""

    value: str
    cut: int | None = None
    check: str = ""  # the rewrite applies only to paths starting with it (else: as is)
    pattern: str = ""
    substitution: str = ""


@dataclass(frozen=True)
class ClusterAction:
    """Forward to a cluster (one, or weighted by ``weight/sum(weights)``).

    ``path_rewrite``: the route's regex_rewrite as the kernel does it (None:
    no regex_rewrite, or one only Envoy does: the route is ENVOY then)."""

    clusters: tuple[WeightedCluster, ...]
    prefix_rewrite: str | None = None
    host_rewrite: str | None = None
    timeout_ms: int | None = None  # None: no timeout (Envoy "0s"); Envoy default 15000
    idle_timeout_ms: int | None = None
    cluster_header: str | None = None  # route.cluster_header (always ENVOY)
    hash_header: str | None = None  # hash_policy header, for RING_HASH/MAGLEV clusters
    retry: RetryPolicy | None = None  # None: the route never retries (or no policy)
    mirrors: tuple[MirrorPolicy, ...] = ()  # request_mirror_policies, in Envoy's order
    path_rewrite: PathRewrite | None = None  # regex_rewrite the kernel does (fastpath.rewrite)


@dataclass(frozen=True)
class DirectResponse:
    """Reply from the kernel with this status and body (no upstream)."""

    status: int
    body: str = ""


@dataclass(frozen=True)
class Redirect:
    """Reply with a 3xx Location (Envoy RedirectAction). None fields keep the request's."""

    status: int = 301
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    prefix_rewrite: str | None = None
    strip_query: bool = False


Action = ClusterAction | DirectResponse | Redirect


@dataclass(frozen=True)
class HeaderValue:
    """A request header to add. ``append`` False means overwrite (set)."""

    name: str
    value: str
    append: bool = True


@dataclass(frozen=True)
class FaultAbort:
    """HTTP fault abort: reply ``status`` to ``per_million`` of requests."""

    status: int
    per_million: int = 1_000_000
    header_controlled: bool = False  # x-envoy-fault-abort-request: ENVOY


@dataclass(frozen=True)
class FaultDelay:
    """HTTP fault delay: hold ``per_million`` of requests ``delay_ms`` before the
    upstream sees them (fastpath.classify_delay builds it; docs/fastpath.md
    "Fault delay")."""

    delay_ms: int
    per_million: int = 1_000_000


@dataclass(frozen=True)
class LocalRateLimit:
    """Envoy local_ratelimit token bucket; an empty bucket replies ``status``."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval_ms: int
    status: int = 429
    enforced_per_million: int = 1_000_000
    # (name, value) lines of the rate-limited reply (response_headers_to_add, in
    # Envoy's order; fastpath.classify_lrl). Never on a response that passed.
    response_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Route:
    """One route of a virtual host, in first-match order.

    ``verdict`` KERNEL: the kernel matches and enforces everything here.
    ``verdict`` ENVOY: a punt entry; ``reason`` names the feature that needs Envoy
    (e.g. "retry_policy retry_on=5xx", "regex not literal: '^/a+b$'").
    ``guard``: a punt entry the classifier put right before the KERNEL route of
    the same name, matching only the requests an Envoy filter acts on (CORS
    requests carry Origin; CSRF checks mutating methods): those go to Envoy,
    the route's other requests stay in the kernel (fastpath.classify_guards).
    Not a route of the policy: coverage does not count it.
    """

    name: str
    match: RouteMatch
    action: Action
    verdict: Verdict
    reason: str = ""
    request_headers_to_add: tuple[HeaderValue, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    fault_abort: FaultAbort | None = None
    rate_limit: LocalRateLimit | None = None
    guard: bool = False
    fault_delay: FaultDelay | None = None


@dataclass(frozen=True)
class VirtualHost:
    """Domains: "a.b" exact, "*.b" suffix wildcard, "a.*" prefix wildcard, "*"."""

    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    request_headers_to_add: tuple[HeaderValue, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Principal:
    """RBAC principal: source CIDR and/or authenticated (mTLS) principal.

    ``any`` matches everything. ``source_cidr`` is "a.b.c.d/len".
    ``authenticated`` is a StringMatch on the peer's URI SAN (never KERNEL: no TLS).
    """

    any: bool = False
    source_cidr: str | None = None
    authenticated: StringMatch | None = None
    invert: bool = False
    header: HeaderMatch | None = None  # RBAC principal `header`


@dataclass(frozen=True)
class Permission:
    """RBAC permission: AND of the non-empty fields; ``any`` matches everything."""

    any: bool = False
    path: StringMatch | None = None
    method: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    port: int | None = None
    invert: bool = False


@dataclass(frozen=True)
class RbacPolicy:
    """A policy matches when ANY permission and ANY principal match (Envoy)."""

    name: str
    permissions: tuple[tuple[Permission, ...], ...]  # OR of AND-groups
    principals: tuple[tuple[Principal, ...], ...]  # OR of AND-groups
    verdict: Verdict = Verdict.KERNEL
    reason: str = ""


@dataclass(frozen=True)
class Rbac:
    """Listener RBAC. ``verdict`` ENVOY if any policy needs Envoy (then all do)."""

    action: str  # "ALLOW" | "DENY"
    policies: tuple[RbacPolicy, ...]
    verdict: Verdict = Verdict.KERNEL
    reason: str = ""
    shadow: bool = False  # shadow rules only log: the kernel ignores them


@dataclass(frozen=True)
class PathNormalization:
    """HttpConnectionManager path handling that changes which route matches."""

    normalize_path: bool = False
    merge_slashes: bool = False
    path_with_escaped_slashes_action: str = "KEEP_UNCHANGED"  # or UNESCAPE_*, REJECT_REQUEST


# Why every route of a listener goes to Envoy when its HCM-level local rate
# limit would otherwise be shared by kernel and Envoy routes (one owner per bucket).
SHARED_BUCKET_REASON = "listener local rate limit bucket is shared with routes that need Envoy"


@dataclass(frozen=True)
class ListenerPlan:
    """One HTTP listener (one HttpConnectionManager filter chain).

    ``verdict`` ENVOY means the kernel must hand every connection of this
    listener to Envoy (e.g. TLS on the downstream, a filter the kernel lacks).
    """

    name: str
    address: str
    port: int
    direction: Direction
    virtual_hosts: tuple[VirtualHost, ...]
    route_config: str = ""
    rbac: Rbac | None = None
    local_rate_limit: LocalRateLimit | None = None
    path_normalization: PathNormalization = field(default_factory=PathNormalization)
    verdict: Verdict = Verdict.KERNEL
    reason: str = ""
    # Order of the policy filters in the HCM (Envoy runs them in this order,
    # before the router): which reply wins when several apply.
    filter_order: tuple[str, ...] = ("rbac", "local_ratelimit", "fault")
    fault_abort: FaultAbort | None = None  # HCM-level abort: also for requests without a route
    # Every RBAC filter of the HCM in chain order (Istio puts a DENY filter before
    # an ALLOW one); each "rbac" of filter_order consumes the next. ``rbac`` is
    # rbacs[0], kept for readers written before: enforce all of ``rbacs``.
    rbacs: tuple[Rbac, ...] = ()
    # The HCM's use_remote_address. Off (Istio's and the local mesh's sidecars),
    # a request without x-forwarded-for is external to Envoy, which then strips
    # the x-envoy-* control headers (x-envoy-expected-rq-timeout-ms, ...) from
    # it: fastpath.inbound_merge drops the kernel's insert of that header for
    # destinations whose inbound sidecar would.
    use_remote_address: bool = False
    # The HCM's tracing (fastpath.tracing.sampling): None without; else how many
    # of the 10000 values of r (an added x-request-id's first 8 hex digits mod
    # 10000) Envoy samples: the id's version digit is 9 when r < it, else 4
    # (bpf_src/dp_xrid.h). Requests with trace headers then go to Envoy.
    trace_sampling: int | None = None
    # "zipkin": the HCM's tracer is Zipkin with the header defaults
    # (fastpath.tracing.provider): an unsampled request gets its b3 lines from
    # the kernel, a sampled one goes to Envoy (which reports its span). "": none.
    trace_provider: str = ""
    # The HCM has tracing and traffic_direction OUTBOUND: its Envoy sends a
    # route's decorator upstream and removes x-envoy-decorator-operation from
    # responses (what fastpath.inbound_merge needs of a client listener in front
    # of a destination whose inbound listener traces).
    trace_egress: bool = False
    # The HCM's overall_sampling as a numerator of 10000 (fastpath.tracing.overall):
    # an INBOUND listener's Envoy unmarks a caller's sampled id with r >= it.
    trace_overall: int = 10000


class LbPolicy(enum.Enum):
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LEAST_REQUEST = "least_request"
    RING_HASH = "ring_hash"
    MAGLEV = "maglev"


@dataclass(frozen=True)
class Endpoint:
    """One upstream endpoint. ``address`` is an IP, or a DNS name (STRICT_DNS /
    LOGICAL_DNS clusters) that the agent resolves before connecting its pool."""

    address: str
    port: int
    weight: int = 1
    healthy: bool = True


@dataclass(frozen=True)
class Cluster:
    """An upstream cluster. ``hash_header`` is set for RING_HASH/MAGLEV on a header.

    ``tls`` True means the upstream needs TLS: the kernel cannot (no kTLS), so
    every route to it is ENVOY.
    """

    name: str
    lb_policy: LbPolicy
    endpoints: tuple[Endpoint, ...]
    hash_header: str | None = None
    tls: bool = False
    verdict: Verdict = Verdict.KERNEL
    reason: str = ""
    max_retries: int = 3  # circuit breaker: concurrent retries of the cluster (Envoy default 3)
    # ORIGINAL_DST picking the downstream connection's destination (not
    # use_http_header): a shadow (no downstream connection) finds no host there,
    # so Envoy sends it nowhere (seen with Envoy 1.40; fastpath.mirror)
    original_dst: bool = False
    # Envoy outlier detection the kernel enforces (fastpath.outlier), None: none
    outlier: OutlierConfig | None = None
    # a `type: EDS` cluster's ClusterLoadAssignment name (eds_cluster_config
    # service_name, else its name); None: endpoints inline (STATIC, STRICT_DNS)
    eds_name: str | None = None


@dataclass(frozen=True)
class KernelPlan:
    """The whole kernel policy of one node (one Envoy sidecar)."""

    node_id: str
    version: str
    listeners: tuple[ListenerPlan, ...] = ()
    clusters: tuple[Cluster, ...] = ()

    def cluster(self, name: str) -> Cluster | None:
        """The cluster called ``name``, or None."""
        for c in self.clusters:
            if c.name == name:
                return c
        return None

    def listener_for(self, address: str, port: int) -> ListenerPlan | None:
        """The listener a connection to ``address:port`` reaches: an exact address
        first, then a wildcard (0.0.0.0 / ::) listener on that port."""
        exact = [lp for lp in self.listeners if lp.port == port and lp.address == address]
        wild = [lp for lp in self.listeners if lp.port == port and lp.address in ("0.0.0.0", "::")]
        found = exact or wild
        return found[0] if found else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the plan (enums as their values), for debugging tools."""
        return _jsonable(self)  # type: ignore[no-any-return]


def _jsonable(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        out = {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (ClusterAction, DirectResponse, Redirect)):
            out = {"type": type(v).__name__, **out}  # which member of the Action union
        return out
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
