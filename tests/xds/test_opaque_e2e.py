"""`l7fp serve --config DIR` with configs the proto library cannot read as written, against
the real Envoy 1.40: a filter config with a field newer than envoy-data-plane
(JwtClaimToHeader.claim_path) is passed to Envoy unchanged (opaque) and is in force there;
Envoy's single-value-for-a-list and lower-case enum forms are served; a typed_config
without @type is one log line naming file, resource and field, and the last good config
keeps serving (xds_server/protojson.py)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from xds_server import resources as res

from .conftest import http_get, start_envoy, wait_for
from .helpers import ROUTER, cluster, free_port

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
NODE = "sidecar~127.0.0.1~opaque-0.test~test.svc.cluster.local"
JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"


def jwks(tmp_path: Path) -> str:
    """A JWKS with a fresh RSA public key (Envoy checks its shape at load)."""
    key = tmp_path / "k.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    out = subprocess.run(["openssl", "rsa", "-in", str(key), "-noout", "-modulus"], check=True,
                         capture_output=True, text=True).stdout
    n = base64.urlsafe_b64encode(bytes.fromhex(out.strip().split("=", 1)[1])).rstrip(b"=").decode()
    return json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "kid": "k", "use": "sig", "e": "AQAB", "n": n}]})


def jwt_listener(port: int, keys: str, router: dict[str, Any] | None = None) -> dict[str, Any]:
    """/secure needs a JWT (401 without one), the rest does not. Written as Envoy reads it but
    envoy-data-plane does not: `filters`, `virtual_hosts` and `domains` as one value instead of
    a list, `codec_type: auto`, and `claim_path` (newer than the library)."""
    return {
        "@type": res.LISTENER, "name": "jwt",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": {"name": "hcm", "typed_config": {
            "@type": res.HCM_URL, "stat_prefix": "jwt", "codec_type": "auto",
            "route_config": {"name": "rc", "virtual_hosts": {"name": "all", "domains": "*", "routes": [
                {"match": {"prefix": "/secure"}, "route": {"cluster": "one"}},
                {"match": {"prefix": "/"}, "route": {"cluster": "one"}}]}},
            "http_filters": [
                {"name": "envoy.filters.http.jwt_authn", "typed_config": {
                    "@type": JWT,
                    "providers": {"p": {"issuer": "https://issuer.example", "local_jwks": {"inline_string": keys},
                                        "claim_to_headers": [{"header_name": "x-tenant",
                                                              "claim_path": [{"key": "tenant"}]}]}},
                    "rules": [{"match": {"prefix": "/secure"}, "requires": {"provider_name": "p"}}]}},
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER} if router is None else router}]}}}],
    }


async def test_opaque_filter_reaches_envoy_and_bad_type_is_one_line(
        config_dir, serve, envoys, envoy_bin, upstreams, tmp_path):
    lport = free_port()
    keys = jwks(tmp_path)
    config_dir.write("clusters.yaml", [cluster("one", upstreams["one"])])
    config_dir.write("listener.yaml", [jwt_listener(lport, keys)])
    serve.start()
    await serve.wait_ready()
    envoy = start_envoy(envoys, envoy_bin, serve.xds_port, NODE, delta=False)
    await envoy.wait_ready()

    async def open_ok() -> bool:
        return (await http_get(lport, "/open"))[:2] == (200, "one")

    await wait_for(open_ok, 15)
    status, body, _ = await http_get(lport, "/secure")
    assert (status, body) == (401, "Jwt is missing"), (status, body)  # the opaque filter is in force
    syncz = await serve.get_json("/debug/syncz")
    (proxy,) = syncz
    assert proxy["types"]["lds"]["acked"] and not proxy["types"]["lds"]["last_nack_error"]

    # Envoy rejects a typed_config without @type: one line naming file, resource, field;
    # the previous config keeps serving
    config_dir.write("listener.yaml", [jwt_listener(lport, keys, router={})])
    want = ("listener.yaml: resources[0].filter_chains[0].filters[0].typed_config.http_filters[1]"
            ".typed_config: no @type: Envoy rejects it (\"Didn't find a registered implementation for "
            "'envoy.filters.http.router' with type URL: ''\")")

    async def logged() -> bool:
        return want in serve.log()

    await wait_for(logged, 10)
    assert "Traceback" not in serve.log()
    assert await open_ok() and (await http_get(lport, "/secure"))[0] == 401

    # a contrib filter (golang) is opaque to L7FP too and served unchanged; this Envoy build
    # has no contrib extensions, so it NACKs, and the NACK (Envoy's words) is what the user sees
    golang = jwt_listener(lport, keys)
    golang["filter_chains"][0]["filters"]["typed_config"]["http_filters"].insert(0, {
        "name": "envoy.filters.http.golang", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.golang.v3alpha.Config",
            "library_id": "x", "library_path": "/nonexistent.so", "plugin_name": "x"}})
    config_dir.write("listener.yaml", [golang])

    async def nacked() -> bool:
        (p,) = await serve.get_json("/debug/syncz")
        return "golang" in (p["types"]["lds"]["last_nack_error"] or "")

    await wait_for(nacked, 10)
    (p,) = await serve.get_json("/debug/syncz")
    print("NACK:", p["types"]["lds"]["last_nack_error"])
    assert await open_ok() and (await http_get(lport, "/secure"))[0] == 401  # last good version
