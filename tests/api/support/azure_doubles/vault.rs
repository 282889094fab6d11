//! The Key Vault secrets double: the bearer challenge, `api-version`, versions on every PUT,
//! `SecretNotFound`, the name and size rules, and injectable throttling and faults.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::*;

#[derive(Deserialize)]
pub(super) struct ApiVersion {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

pub(super) fn kv_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn challenge(message: &str) -> Response {
    let mut response = kv_error(StatusCode::UNAUTHORIZED, "Unauthorized", message);
    let header = format!(
        "Bearer authorization=\"https://login.microsoftonline.com/{TENANT}\", resource=\"{VAULT_RESOURCE}\""
    );
    response
        .headers_mut()
        .insert("www-authenticate", header.parse().expect("header"));
    response
}

/// The checks every vault request goes through, in the service's order: faults, api-version,
/// authentication. `Ok(())` lets the operation run; `Err` is the response to send instead.
#[allow(clippy::result_large_err)] // a test double: the error *is* the response
fn admit(
    state: &VaultState,
    query: &ApiVersion,
    headers: &HeaderMap,
    write: bool,
) -> Result<(), Response> {
    let mut inner = state.shared.lock();
    inner.requests += 1;
    if let Some(k) = inner.throttle_every {
        if inner.requests.is_multiple_of(k) {
            *inner.ops.entry("throttled").or_default() += 1;
            let mut response = kv_error(
                StatusCode::TOO_MANY_REQUESTS,
                "Throttled",
                "Operations per second is over the allowed limit.",
            );
            response
                .headers_mut()
                .insert("retry-after", "1".parse().expect("header"));
            return Err(response);
        }
    }
    if query.api_version.as_deref().is_none_or(str::is_empty) {
        return Err(kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "The request URI must contain the api-version query parameter.",
        ));
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        *inner.ops.entry("challenge").or_default() += 1;
        return Err(challenge(
            "AKV10000: Request is missing a Bearer or PoP token.",
        ));
    };
    match inner.tokens.get(token) {
        Some(resource) if resource == VAULT_RESOURCE => {}
        Some(_) => return Err(challenge("AKV10022: Invalid audience.")),
        None => return Err(challenge("AKV10032: Invalid issuer.")),
    }
    if write && inner.fail_writes > 0 {
        inner.fail_writes -= 1;
        *inner.ops.entry("failed").or_default() += 1;
        return Err(kv_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "The service is temporarily unavailable.",
        ));
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn bundle(base: &str, name: &str, version: &Version) -> Value {
    json!({
        "value": version.value,
        "contentType": version.content_type,
        "id": format!("{base}/secrets/{name}/{}", version.id),
        "attributes": {
            "enabled": true,
            "created": version.created,
            "updated": version.created,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        },
        "tags": version.tags,
    })
}

fn not_found(name: &str) -> Response {
    kv_error(
        StatusCode::NOT_FOUND,
        "SecretNotFound",
        &format!("A secret with (name/id) {name} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"),
    )
}

pub(super) async fn get_latest(
    State(state): State<VaultState>,
    Path(name): Path<String>,
    Query(query): Query<ApiVersion>,
    headers: HeaderMap,
) -> Response {
    let delay = {
        let mut inner = state.shared.lock();
        if headers.contains_key(axum::http::header::AUTHORIZATION) {
            *inner.ops.entry("get_started").or_default() += 1;
        }
        inner.read_delay
    };
    if !delay.is_zero() && headers.contains_key(axum::http::header::AUTHORIZATION) {
        tokio::time::sleep(delay).await;
    }
    read(state, name, None, query, headers)
}

pub(super) async fn get_version(
    State(state): State<VaultState>,
    Path((name, version)): Path<(String, String)>,
    Query(query): Query<ApiVersion>,
    headers: HeaderMap,
) -> Response {
    let version = Some(version).filter(|v| !v.is_empty());
    read(state, name, version, query, headers)
}

fn read(
    state: VaultState,
    name: String,
    version: Option<String>,
    query: ApiVersion,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = admit(&state, &query, &headers, false) {
        return response;
    }
    let mut inner = state.shared.lock();
    *inner.ops.entry("get").or_default() += 1;
    if !valid_name(&name) {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            &format!("The request URI contains an invalid name: {name}"),
        );
    }
    let found = inner
        .secrets
        .get(&name.to_ascii_lowercase())
        .and_then(|versions| match &version {
            None => versions.last(),
            Some(id) => versions.iter().find(|v| &v.id == id),
        });
    match found {
        Some(v) => Json(bundle(&state.base, &name, v)).into_response(),
        None => not_found(&name),
    }
}

#[derive(Deserialize)]
struct SetParameters {
    value: Option<String>,
    #[serde(rename = "contentType")]
    content_type: Option<String>,
    tags: Option<HashMap<String, String>>,
}

pub(super) async fn set_secret(
    State(state): State<VaultState>,
    Path(name): Path<String>,
    Query(query): Query<ApiVersion>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = admit(&state, &query, &headers, true) {
        return response;
    }
    if state
        .shared
        .lock()
        .forbidden_writes
        .contains(&name.to_ascii_lowercase())
    {
        *state.shared.lock().ops.entry("forbidden").or_default() += 1;
        return kv_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Caller is not authorized to perform action on resource. Action: 'Microsoft.KeyVault/vaults/secrets/setSecret/action'",
        );
    }
    if !valid_name(&name) {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            &format!("The request URI contains an invalid name: {name}"),
        );
    }
    let Ok(parameters) = serde_json::from_slice::<SetParameters>(&body) else {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "The request body is not valid JSON.",
        );
    };
    let Some(value) = parameters.value else {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "Property 'value' is required.",
        );
    };
    if value.len() > MAX_VALUE_BYTES {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "Secret value exceeds the maximum allowed size of 25 KB.",
        );
    }
    let tags = parameters.tags.unwrap_or_default();
    if tags.len() > 15 {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "A maximum of 15 tags is allowed.",
        );
    }
    let version = new_version(value, parameters.content_type, json!(tags));
    let mut inner = state.shared.lock();
    *inner.ops.entry("set").or_default() += 1;
    let response = bundle(&state.base, &name, &version);
    inner
        .secrets
        .entry(name.to_ascii_lowercase())
        .or_default()
        .push(version);
    Json(response).into_response()
}
