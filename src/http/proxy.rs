//! `/api/proxy/{connection}/{*path}`: forwards a caller's request to the connection's API
//! (`api_base_url`) with a fresh access token, so a Data Factory Copy activity can read a
//! provider's API in one step and no token enters the pipeline.
//!
//! Authenticated like `/api/refresh`. The forwarded URL is always under the configured base
//! (no traversal, no other scheme, host or port; redirects are not followed). The caller's
//! credentials, cookies and hop-by-hop headers are never forwarded; the upstream's
//! `Set-Cookie` never comes back; everything else — status, body, `Link`, `Retry-After`,
//! continuation headers — comes back untouched, the body streamed.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode, Uri};
use axum::response::Response;
use url::Url;

use super::{ApiError, AppState};
use crate::auth::Role;
use crate::broker::TokenRequest;
use crate::token::TokenRecord;

/// Marks an answer relayed from the API: the framework-error rewriting leaves it alone.
#[derive(Clone, Copy)]
pub(super) struct Relayed;

/// Request headers never forwarded: the caller's credentials and cookies, hop-by-hop
/// headers (RFC 9110 §7.6.1), and what the Functions host and proxies in front add.
fn forwardable_request_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    !matches!(
        name,
        "authorization"
            | "x-api-key"
            | "cookie"
            | "host"
            | "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "forwarded"
    ) && !name.starts_with("x-forwarded-")
        && !name.starts_with("x-azure-")
        && !name.starts_with("x-ms-client-principal")
        && !name.starts_with("x-arr-")
        && !name.starts_with("x-original-")
}

/// Response headers never returned: cookies and hop-by-hop headers (the length is the
/// streamed body's business).
fn returnable_response_header(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "set-cookie"
            | "set-cookie2"
            | "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

/// The upstream URL for `rest` (the raw, still percent-encoded path after
/// `/api/proxy/{connection}/`) and `query`, or why it would leave `base`.
pub(super) fn target_url(base: &Url, rest: &str, query: Option<&str>) -> Result<Url, &'static str> {
    if rest.is_empty() {
        return Err("name a path under the API, e.g. /api/proxy/{connection}/api.xro/2.0/Invoices");
    }
    // Judge the path as the upstream will read it: decoded. Encoded separators are refused
    // outright (`%2f`, `%5c`), so decoding cannot create a segment the check did not see.
    let lower = rest.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || rest.contains('\\') {
        return Err("encoded or backward slashes are not allowed in a proxied path");
    }
    let decoded = percent_decode(rest).ok_or("the path is not valid percent-encoded UTF-8")?;
    if decoded.chars().any(char::is_control) {
        return Err("control characters are not allowed in a proxied path");
    }
    for segment in decoded.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err("empty, `.` and `..` path segments are not allowed in a proxied path");
        }
    }
    if decoded.contains("://") {
        return Err("absolute URLs are not allowed in a proxied path");
    }
    let mut text = format!("{}/{rest}", base.as_str().trim_end_matches('/'));
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        text.push('?');
        text.push_str(query);
    }
    let url = Url::parse(&text).map_err(|_| "the proxied path does not make a valid URL")?;
    // Belt and braces: the result must still be under the base.
    let same_origin = url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default();
    let base_path = base.path().trim_end_matches('/');
    if !same_origin || !url.path().starts_with(&format!("{base_path}/")) {
        return Err("the proxied path leaves the connection's API");
    }
    Ok(url)
}

/// The query without the broker's own `tenant` parameter, and that parameter's value.
fn split_tenant(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut tenant = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name == "tenant" {
                tenant = percent_decode(&value.replace('+', " "));
                false
            } else {
                true
            }
        })
        .collect();
    let kept = kept.join("&");
    ((!kept.is_empty()).then_some(kept), tenant)
}

/// The Xero organisation for a request: the one named by `tenant` (id or name), else the only
/// one consented; several and none named is the caller's to resolve (the error lists them).
fn xero_tenant(
    extra: &serde_json::Map<String, serde_json::Value>,
    requested: Option<&str>,
) -> Result<Option<String>, String> {
    let tenants: Vec<(String, String)> = extra
        .get("tenants")
        .and_then(|t| t.as_array())
        .map(|all| {
            all.iter()
                .filter_map(|t| {
                    Some((
                        t["tenant_id"].as_str()?.to_owned(),
                        t["tenant_name"].as_str().unwrap_or_default().to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    match (requested, tenants.as_slice()) {
        (Some(wanted), _) => tenants
            .iter()
            .find(|(id, name)| id.eq_ignore_ascii_case(wanted) || name == wanted)
            .map(|(id, _)| Some(id.clone()))
            .ok_or_else(|| {
                format!(
                    "tenant `{wanted}` is not one this connection was granted: {}",
                    list(&tenants)
                )
            }),
        (None, []) => Ok(None),
        (None, [(id, _)]) => Ok(Some(id.clone())),
        (None, _) => Err(format!(
            "this connection was granted several Xero organisations: name one with ?tenant= ({})",
            list(&tenants)
        )),
    }
}

fn list(tenants: &[(String, String)]) -> String {
    tenants
        .iter()
        .map(|(id, name)| format!("{id} ({name})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Strict percent-decoding to UTF-8: a malformed escape (`%zz`, a lone `%`) is an error,
/// where the percent-encoding crate's decoder would pass it through as text — a proxied path
/// with one is refused rather than guessed at.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Forwards to the connection's API with a fresh access token; the API's answer comes back
/// as it is (status, body, `Link` and other headers; never `Set-Cookie`). POST, PUT, PATCH
/// and DELETE are forwarded the same way (the document lists GET, what a Copy activity's
/// REST source sends).
#[utoipa::path(
    get,
    path = "/api/proxy/{connection}/{path}",
    tag = "proxy",
    params(
        ("connection" = String, Path, description = "The connection's name from the config"),
        ("path" = String, Path, description = "The path under the connection's api_base_url; no `.`/`..` segments, encoded slashes or backslashes"),
        ("tenant" = Option<String>, Query, description = "Xero: the organisation (id or name) when the connection was granted several; the broker's parameter, not forwarded"),
    ),
    // Any status can come from the API itself, with any body, so no status is the
    // broker's alone: one `default` answer, described.
    responses(
        (status = "default", description = "The API's own answer, relayed untouched; or the broker's JSON error (ErrorBody): 400 a path that would leave the API, 401/403 the caller's credential, 404 no such connection or no proxy for it, 409 consent required, 413 a body over 64 KB, 429 the force limit, 502 the API unreachable, 503 store, lease or setup unavailable"),
    ),
    security(("api_key" = []), ("entra" = []))
)]
pub(super) async fn proxy(
    State(state): State<Arc<AppState>>,
    Path((connection, _)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state.auth.authenticate(&headers, Role::Caller).await?;
    // Unknown connections answer as /api/refresh does.
    state
        .broker
        .provider(&connection)
        .map_err(|err| ApiError::from_broker(err, &state))?;
    let Some(base) = state.proxy_bases.get(&connection) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_proxy",
            format!("connection `{connection}` has no proxy: set its api_base_url (and proxy is not false)"),
        ));
    };
    // The raw path after the route's prefix, as the caller encoded it.
    let prefix = format!("/api/proxy/{connection}/");
    let rest = uri.path().strip_prefix(&prefix).unwrap_or_default();
    // `tenant` picks a Xero organisation; it is the broker's parameter, not the API's.
    let (query, tenant) = split_tenant(uri.query());
    let target = target_url(base, rest, query.as_deref())
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", why))?;
    let is_xero = state
        .broker
        .provider(&connection)
        .is_ok_and(|p| p.kind() == crate::config::ProviderKind::Xero);

    let body = super::read_body(body, super::MAX_BODY).await?;
    let mut forwarded = reqwest::header::HeaderMap::new();
    for (name, value) in headers
        .iter()
        .filter(|(n, _)| n.as_str() != "xero-tenant-id")
    {
        if forwardable_request_header(name) {
            forwarded.append(name.clone(), value.clone());
        }
    }

    let token = |request: TokenRequest| {
        let state = Arc::clone(&state);
        let connection = connection.clone();
        async move {
            state
                .broker
                .token(&connection, request)
                .await
                .map_err(|err| ApiError::from_broker(err, &state))
        }
    };
    let record = token(TokenRequest::default()).await?;
    if is_xero {
        // Xero wants the organisation in `xero-tenant-id` (recorded at consent).
        if let Some(tenant) = xero_tenant(&record.extra, tenant.as_deref())
            .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", why))?
        {
            let value = reqwest::header::HeaderValue::from_str(&tenant).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "not a tenant id",
                )
            })?;
            forwarded.insert("xero-tenant-id", value);
        }
    }
    let send = |record: Arc<TokenRecord>| {
        let request = state
            .proxy_http
            .request(method.clone(), target.clone())
            .headers(forwarded.clone());
        let body = body.clone();
        let connection = connection.clone();
        async move {
            let Some(access_token) = record.access_token.as_ref() else {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "consent_required",
                    format!("connection `{connection}` has no access token: an admin must consent"),
                ));
            };
            let mut bearer = reqwest::header::HeaderValue::from_str(&format!(
                "Bearer {}",
                access_token.secret()
            ))
            .map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "provider_error",
                    "the access token cannot be sent as a header",
                )
            })?;
            bearer.set_sensitive(true);
            let mut request = request.header(header::AUTHORIZATION, bearer);
            if !body.is_empty() {
                request = request.body(body);
            }
            request.send().await.map_err(|err| {
                tracing::warn!(connection = %connection, timeout = err.is_timeout(), "proxied request failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "provider_unavailable",
                    "the provider's API could not be reached or did not answer in time",
                )
            })
        }
    };

    let mut upstream = send(Arc::clone(&record)).await?;
    if upstream.status() == StatusCode::UNAUTHORIZED {
        // The API refused a token the broker thought valid (revoked, or its clock disagrees):
        // one forced refresh (within the connection's force limit) and one retry — the body
        // is buffered, so the request can be sent again. Otherwise the 401 goes back.
        match token(TokenRequest {
            force: true,
            ..TokenRequest::default()
        })
        .await
        {
            Ok(fresh)
                if fresh.access_token.as_ref().map(|t| t.secret())
                    != record.access_token.as_ref().map(|t| t.secret()) =>
            {
                tracing::info!(connection = %connection, "the API refused the access token; refreshed it and retrying once");
                upstream = send(fresh).await?;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(connection = %connection, "the API refused the access token and no new one could be had: {}", err.description);
            }
        }
    }
    let status = upstream.status();
    tracing::info!(connection = %connection, method = %method, status = status.as_u16(), "proxied");
    let mut response = Response::builder().status(status).extension(Relayed);
    for (name, value) in upstream.headers() {
        if returnable_response_header(name) {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from_stream(upstream.bytes_stream()))
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "provider_error",
                "the provider's answer could not be relayed",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_parameter_is_the_brokers_and_picks_a_xero_organisation() {
        assert_eq!(
            split_tenant(Some("page=2&tenant=Demo%20Co&where=a%3Db")),
            (
                Some("page=2&where=a%3Db".to_owned()),
                Some("Demo Co".to_owned())
            )
        );
        assert_eq!(split_tenant(Some("tenant=x")), (None, Some("x".to_owned())));
        assert_eq!(split_tenant(None), (None, None));
        let two = serde_json::json!({"tenants": [
            {"tenant_id": "aaa-1", "tenant_name": "Demo Co"},
            {"tenant_id": "bbb-2", "tenant_name": "Other Ltd"},
        ]});
        let two = two.as_object().expect("map");
        assert_eq!(
            xero_tenant(two, Some("Demo Co")),
            Ok(Some("aaa-1".to_owned()))
        );
        assert_eq!(
            xero_tenant(two, Some("BBB-2")),
            Ok(Some("bbb-2".to_owned()))
        );
        let err = xero_tenant(two, None).expect_err("several, none named");
        assert!(
            err.contains("aaa-1 (Demo Co)") && err.contains("bbb-2 (Other Ltd)"),
            "{err}"
        );
        assert!(xero_tenant(two, Some("nope")).is_err());
        let one =
            serde_json::json!({"tenants": [{"tenant_id": "aaa-1", "tenant_name": "Demo Co"}]});
        assert_eq!(
            xero_tenant(one.as_object().expect("map"), None),
            Ok(Some("aaa-1".to_owned()))
        );
        assert_eq!(xero_tenant(&serde_json::Map::new(), None), Ok(None));
    }

    #[test]
    fn paths_stay_under_the_base() {
        let base = Url::parse("https://api.example.com/v2").expect("url");
        let ok = target_url(&base, "invoices/42", Some("page=2&x=%20y")).expect("under the base");
        assert_eq!(
            ok.as_str(),
            "https://api.example.com/v2/invoices/42?page=2&x=%20y"
        );
        for bad in [
            "",
            "../admin",
            "a/../../admin",
            "%2e%2e/admin",
            "a/%2E%2e/b",
            "a%2fb",
            "a%5cb",
            "a\\b",
            "/evil.example/x",
            "a//b",
            "https://evil.example/x",
            "https:%2f%2fevil.example",
            "a/./b",
            "a%00b",
            "%ff",
        ] {
            assert!(
                target_url(&base, bad, None).is_err(),
                "{bad:?} was accepted"
            );
        }
    }
}
