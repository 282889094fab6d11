//! Entra ID bearer tokens as the tenant double's key signs them (how Data Factory's managed
//! identity calls the broker), and the `[auth.entra]` table that accepts them.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::azure_doubles::TENANT;

/// The broker's Application ID URI in these tests.
pub const AUDIENCE: &str = "api://token-broker-test";

/// `[auth.entra]` for the tenant double at `authority`.
pub fn entra_table(authority: &str, allowed: &[&str], admins: &[&str]) -> String {
    let list = |ids: &[&str]| {
        ids.iter()
            .map(|id| format!("\"{id}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[auth.entra]\ntenant_id = \"{TENANT}\"\naudiences = [\"{AUDIENCE}\"]\n\
         allowed_principals = [{}]\nadmin_principals = [{}]\nauthority = \"{authority}\"",
        list(allowed),
        list(admins),
    )
}

/// Claims as Entra ID issues them for a managed identity, with the v2 issuer of the
/// authority the broker is configured with (the double's).
pub fn claims_from(authority: &str, oid: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "aud": AUDIENCE,
        "iss": format!("{authority}/{TENANT}/v2.0"),
        "iat": now, "nbf": now, "exp": now + 3600,
        "oid": oid, "sub": oid, "tid": TENANT,
        "azp": "00000000-0000-0000-0000-0000000000a1", "idtyp": "app",
    })
}

/// `claims` signed RS256 with `pem` under `kid`.
pub fn sign_with(claims: &Value, pem: &[u8], kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(pem).expect("key"),
    )
    .expect("sign")
}

/// `claims` signed with the key the tenant double publishes.
pub fn sign(claims: &Value) -> String {
    sign_with(
        claims,
        include_bytes!("../../fixtures/entra-signing-key.pem"),
        "test-key-1",
    )
}
