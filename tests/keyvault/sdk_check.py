"""Drive the Key Vault and managed-identity doubles with Microsoft's official Python SDK.

If the doubles were not faithful to the real REST contracts (challenge flow, api-version,
versions, 404 SecretNotFound, name rules, 429 with Retry-After), this official client would
fail here. Environment: KEY_VAULT_URL, IDENTITY_ENDPOINT, IDENTITY_HEADER, REQUESTS_CA_BUNDLE,
and TEST_VAULT_CONNECT (host:port the vault's connections really go to: the vault URL names
port 443, as real vaults do, and nothing may edit /etc/hosts or bind a privileged port).
Prints one JSON line with what it observed; exits non-zero on the first mismatch.
"""

import json
import os
import sys
from urllib.parse import urlsplit

import urllib3.util.connection

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.identity import ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient


def redirect_vault_connections() -> None:
    """Sends connections for the vault's host and port to TEST_VAULT_CONNECT, in this process
    only (TLS still checks the vault's name)."""
    target = os.environ.get("TEST_VAULT_CONNECT")
    if not target:
        return
    vault = urlsplit(os.environ["KEY_VAULT_URL"])
    vault_address = (vault.hostname, vault.port or 443)
    host, port = target.rsplit(":", 1)
    original = urllib3.util.connection.create_connection

    def create_connection(address, *args, **kwargs):
        if tuple(address) == vault_address:
            address = (host, int(port))
        return original(address, *args, **kwargs)

    urllib3.util.connection.create_connection = create_connection


def main() -> int:
    redirect_vault_connections()
    credential = ManagedIdentityCredential()
    client = SecretClient(vault_url=os.environ["KEY_VAULT_URL"], credential=credential)
    seen = {}

    try:
        client.get_secret("never-written")
        raise AssertionError("reading a missing secret must fail")
    except ResourceNotFoundError as err:
        assert err.error.code == "SecretNotFound", err.error.code
        seen["not_found"] = err.error.code

    first = client.set_secret("py-check", "value-one", content_type="text/plain", tags={"k": "v"})
    second = client.set_secret("py-check", "value-two")
    assert first.properties.version and second.properties.version, "versions are returned"
    assert first.properties.version != second.properties.version, "every set is a new version"
    assert first.properties.content_type == "text/plain"
    assert first.properties.tags == {"k": "v"}
    assert client.get_secret("py-check").value == "value-two"
    assert client.get_secret("py-check", first.properties.version).value == "value-one"
    assert client.get_secret("PY-CHECK").value == "value-two", "names are case-insensitive"
    seen["versions"] = [first.properties.version, second.properties.version]

    try:
        client.set_secret("bad_name", "x")
        raise AssertionError("an invalid name must be refused")
    except HttpResponseError as err:
        assert err.status_code == 400, err.status_code
        seen["bad_name"] = err.status_code

    try:
        client.set_secret("too-big", "x" * (25 * 1024 + 1))
        raise AssertionError("a value over 25 KB must be refused")
    except HttpResponseError as err:
        assert err.status_code == 400, err.status_code
        seen["too_big"] = err.status_code

    # The Rust test turns on throttling before this point when it wants to; the SDK's
    # retry policy must absorb 429 + Retry-After.
    for i in range(4):
        client.set_secret("py-throttled", f"value-{i}")
    assert client.get_secret("py-throttled").value == "value-3"

    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
