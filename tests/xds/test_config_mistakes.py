"""Config mistakes said in one line naming the field: the admin API's REST endpoints
given a wrong body or path (a 400, docs/control-plane.md "REST"), and a resource a
config file, REST or `l7fp split` reads."""

from __future__ import annotations

import aiohttp
import pytest

from xds_server import resources as res
from xds_server.serve import options, running

from .helpers import cluster


async def test_rest_says_what_is_wrong(config_dir) -> None:
    config_dir.write("c.yaml", [cluster("a")])
    async with running(options(config=str(config_dir.path), xds_address="127.0.0.1", xds_port=0,
                               admin_port=0, debounce_ms=10, fastpath="off")) as srv:
        base = f"http://127.0.0.1:{srv.admin_port}/config/nodes/n1/resources"
        async with aiohttp.ClientSession() as s:
            # was PyYAML's text joined: `... in "<unicode string>", line 1, column 1: {not json ^ ...`
            r = await s.put(base, data="{not json")
            assert (r.status, await r.json()) == (400, {
                "error": "body: not valid YAML/JSON: line 1, column 10: expected ',' or '}', "
                         "but got '<stream end>'"})
            # was a 404 `no cluster 'a' for node 'n1'`, as if the name were wrong
            r = await s.delete(base + "/cluster/a")
            assert (r.status, await r.json()) == (400, {
                "error": "type 'cluster': expected one of cds, eds, lds, rds, sds or a type URL"})
            assert (await s.put(base, json={"resources": [cluster("b")]})).status == 200
            url = res.CLUSTER.replace("/", "%2F")  # a type URL in the path, its '/' escaped
            r = await s.delete(f"{base}/{url}/b")
            assert r.status == 200, await r.text()


def test_a_duration_given_as_a_number_is_named() -> None:
    """`connect_timeout: 5` was refused with betterproto2's `unsupported operand type(s) for
    //: 'int' and 'datetime.timedelta'`; Envoy 1.40 refuses it too (`envoy --mode validate`:
    "message google.protobuf.Duration ... expected '\\"'"). Same path for files, REST, split."""
    res.ensure_registered()
    with pytest.raises(res.ResourceError) as exc:
        res.parse_resource({"@type": res.CLUSTER, "name": "x", "connect_timeout": 5}, "resources[0]")
    assert str(exc.value) == ('resources[0].connect_timeout: a duration is a string with its unit, '
                              'such as "5s" (got 5): Envoy rejects it')
    ok = res.parse_resource({"@type": res.CLUSTER, "name": "x", "connect_timeout": "5s"})
    assert ok.connect_timeout.total_seconds() == 5


ADDRESS = "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"


def _cluster(**fields: object) -> dict[str, object]:
    return {"@type": res.CLUSTER, "name": "x", "connect_timeout": "1s", **fields}


def _endpoint(port: object) -> dict[str, object]:
    return {"cluster_name": "x", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
        "socket_address": {"address": "198.18.0.1", "port_value": port}}}}]}]}


def test_scalars_envoy_refuses_are_named_with_their_field() -> None:
    """`port_value: abc` said `invalid literal for int() with base 10: 'abc'` and
    `connect_timeout: 100ms` `Invalid duration string`, without the field; Envoy 1.40
    refuses both (`envoy --mode validate`: `... port_value: uint32 ...`, `... Duration ...`)."""
    res.ensure_registered()
    cases = [
        (_cluster(load_assignment=_endpoint("abc")), f"{ADDRESS}: 'abc' is not an integer"),
        (_cluster(load_assignment=_endpoint(-1)), f"{ADDRESS}: -1 is negative, the field is unsigned"),
        (_cluster(per_connection_buffer_limit_bytes="lots"),
         "per_connection_buffer_limit_bytes: 'lots' is not an integer"),
        (_cluster(connect_timeout="100ms"),
         "connect_timeout: '100ms' is not a duration: seconds with an s, such as \"0.25s\""),
    ]
    for body, said in cases:
        with pytest.raises(res.ResourceError) as exc:
            res.parse_resource(body, "resources[0]")
        assert str(exc.value) == f"resources[0].{said}: Envoy rejects it"
    for body in (_cluster(load_assignment=_endpoint("80")), _cluster(connect_timeout="0.25s"),
                 _cluster(load_assignment=_endpoint(80.0))):  # Envoy's JSON takes these
        res.parse_resource(body, "resources[0]")


def test_a_misspelt_field_gets_a_suggestion() -> None:
    """`conect_timeout` said only `Unknown field 'conect_timeout' in message Cluster`; a
    field newer than the proto library (JwtClaimToHeader's `claim_path`, close to
    `claim_name` at 0.8) gets no suggestion."""
    res.ensure_registered()
    with pytest.raises(res.ResourceError) as exc:
        res.parse_resource({"@type": res.CLUSTER, "name": "x", "conect_timeout": "1s"}, "resources[0]")
    assert str(exc.value) == ("resources[0]: Unknown field 'conect_timeout' in message Cluster "
                              "(did you mean 'connect_timeout'?)")
    with pytest.raises(res.ResourceError) as exc:
        res.parse_resource({"@type": res.CLUSTER, "name": "x", "bogus_field": 1}, "resources[0]")
    assert str(exc.value) == "resources[0]: Unknown field 'bogus_field' in message Cluster"
    from xds_server.protojson import _did_you_mean
    assert _did_you_mean("claim_path", ["header_name", "claim_name"]) == ""
