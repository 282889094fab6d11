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

use super::code::ErrorCode;
use super::{ApiError, AppState};
use crate::auth::Role;
use crate::broker::TokenRequest;
use crate::config::ProxyBase;
use crate::token::TokenRecord;

/// Marks an answer relayed from the API: the framework-error rewriting leaves it alone.
#[derive(Clone, Copy)]
pub(super) struct Relayed;

/// The methods relayed to the API (and documented): what REST APIs and a Copy activity's
/// REST source use. TRACE would echo the request — the broker's bearer token included —
/// back to the caller; CONNECT and the rest have no place in an API call.
pub(super) const RELAYED_METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// Request headers never forwarded: the caller's credentials and cookies, hop-by-hop
/// headers (RFC 9110 §7.6.1), what the Functions host, App Service and proxies in front add
/// (Easy Auth's principal and token store — `X-MS-TOKEN-AAD-ACCESS-TOKEN` and friends are
/// the signed-in caller's own tokens — and the client's address), and Xero's tenant header,
/// which the broker sets from the consent.
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
            | "x-client-ip"
            | "x-client-port"
            | "x-real-ip"
            | "xero-tenant-id"
    ) && !name.starts_with("x-forwarded-")
        && !name.starts_with("x-azure-")
        && !name.starts_with("x-ms-client-principal")
        && !name.starts_with("x-ms-token-")
        && !name.starts_with("x-arr-")
        && !name.starts_with("x-original-")
}

/// The caller's headers that go on to the API: [`forwardable_request_header`], less every
/// header the caller's `Connection` header names — those are hop-by-hop for this hop only
/// (RFC 9110 §7.6.1: "a proxy … MUST remove … each connection option").
fn forwarded_headers(headers: &HeaderMap) -> reqwest::header::HeaderMap {
    let nominated: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|option| option.trim().to_ascii_lowercase())
        .filter(|option| !option.is_empty())
        .collect();
    let mut forwarded = reqwest::header::HeaderMap::new();
    for (name, value) in headers {
        if forwardable_request_header(name) && !nominated.iter().any(|n| n == name.as_str()) {
            forwarded.append(name.clone(), value.clone());
        }
    }
    forwarded
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

/// Refuses a proxied path (`rest`: the raw, still percent-encoded path after
/// `/api/proxy/{connection}/`) that could leave the API's base once the upstream decodes it.
pub(super) fn check_path(rest: &str) -> Result<(), &'static str> {
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
    Ok(())
}

/// The upstream URL for `rest` (see [`check_path`]) and `query`, or why it would leave
/// `base`.
pub(super) fn target_url(base: &Url, rest: &str, query: Option<&str>) -> Result<Url, &'static str> {
    check_path(rest)?;
    let mut text = format!("{}/{rest}", base.as_str().trim_end_matches('/'));
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        text.push('?');
        text.push_str(query);
    }
    let url = Url::parse(&text).map_err(|_| "the proxied path does not make a valid URL")?;
    // Belt and braces: the result must still be under the base.
    if under_base(&url, base).is_none() {
        return Err("the proxied path leaves the connection's API");
    }
    Ok(url)
}

/// The path of `url` below `base` (without the leading slash) when `url` is on the same
/// origin and under the base's path.
fn under_base<'u>(url: &'u Url, base: &Url) -> Option<&'u str> {
    let same_origin = url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default();
    let base_path = base.path().trim_end_matches('/');
    let rest = url.path().strip_prefix(base_path)?.strip_prefix('/')?;
    same_origin.then_some(rest)
}

/// Values the broker fills into a proxied path from what consent recorded: QuickBooks'
/// company (`realm_id`, from the redirect) and Exact Online's division (`division`, from
/// `/api/v1/current/Me`).
const PLACEHOLDERS: &[&str] = &["realm_id", "division"];

/// `rest` with `{realm_id}` / `{division}` (raw or percent-encoded braces) replaced by the
/// connection's recorded values. A placeholder the broker does not know, or one the
/// consent did not record, is the caller's error.
fn fill_placeholders(
    rest: &str,
    extra: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, String> {
    let mut out = String::with_capacity(rest.len());
    let mut remaining = rest;
    loop {
        let lower = remaining.to_ascii_lowercase();
        let open = [(lower.find('{'), 1), (lower.find("%7b"), 3)]
            .into_iter()
            .filter_map(|(at, len)| Some((at?, len)))
            .min();
        let Some((at, open_len)) = open else {
            out.push_str(remaining);
            return Ok(out);
        };
        let after = &lower[at + open_len..];
        let close = [(after.find('}'), 1), (after.find("%7d"), 3)]
            .into_iter()
            .filter_map(|(at, len)| Some((at?, len)))
            .min();
        let Some((name_len, close_len)) = close else {
            out.push_str(remaining);
            return Ok(out);
        };
        let name = &remaining[at + open_len..at + open_len + name_len];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "`{{{name}}}` is not a placeholder the broker fills in (it knows {{realm_id}} for QuickBooks and {{division}} for Exact Online)"
            ));
        }
        let value = match extra.get(name) {
            Some(serde_json::Value::String(text)) => text.clone(),
            Some(serde_json::Value::Number(number)) => number.to_string(),
            _ => {
                return Err(format!(
                    "this connection's consent recorded no `{name}` to fill in `{{{name}}}`"
                ))
            }
        };
        if value.is_empty()
            || !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!("the recorded `{name}` cannot be used in a path"));
        }
        out.push_str(&remaining[..at]);
        out.push_str(&value);
        remaining = &remaining[at + open_len + name_len + close_len..];
    }
}

/// The API base for a request: the configured one, or the one the provider named in the
/// token response (Salesforce's `instance_url`). A provider-named base must be https,
/// without credentials or query, and — unless `local_mode` — not on this machine or a
/// private, link-local or otherwise internal address: a hostile or compromised provider
/// must not turn the proxy against the broker's own network (the instance metadata
/// service at 169.254.169.254, the Functions host's loopback port) with a bearer token.
/// Host names are judged as written; the proxy client does not follow redirects.
fn resolve_base(base: &ProxyBase, record: &TokenRecord, local_mode: bool) -> Result<Url, ApiError> {
    match base {
        ProxyBase::Fixed(url) => Ok(url.clone()),
        ProxyBase::FromRecord(field) => {
            let named = record
                .extra
                .get(*field)
                .and_then(|v| v.as_str())
                .and_then(|text| Url::parse(text.trim_end_matches('/')).ok())
                .filter(|url| {
                    let internal = is_internal(url);
                    (url.scheme() == "https" || (local_mode && crate::presets::is_loopback(url)))
                        && (local_mode || !internal)
                        && url.query().is_none()
                        && url.username().is_empty()
                        && url.password().is_none()
                });
            named.ok_or_else(|| {
                ApiError::provider_error(format!("the provider named no usable `{field}` for the proxy (https, on a public address; consent again, or set api_base_url)"),
                )
            })
        }
    }
}

/// Whether `url`'s host is this machine or an address that is not on the public Internet:
/// loopback, private (RFC 1918, RFC 4193), link-local (the cloud metadata services),
/// shared (RFC 6598), unspecified, or a name for this machine.
fn is_internal(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            domain == "localhost" || domain.ends_with(".localhost") || domain.ends_with(".internal")
        }
        Some(url::Host::Ipv4(ip)) => is_internal_ip(ip.into()),
        Some(url::Host::Ipv6(ip)) => is_internal_ip(ip.into()),
        None => true,
    }
}

fn is_internal_ip(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(ip) => {
            let [a, b, ..] = ip.octets();
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
        }
        std::net::IpAddr::V6(ip) => {
            let first = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_internal_ip(v4.into()))
        }
    }
}

/// A `Link` or `Location` URL that points into the API, as the proxy URL that reaches it
/// (keeping the caller's `tenant`), so paging by RFC 8288 links — Data Factory's REST source
/// follows them by default — goes through the broker instead of straight to the API
/// without a token. Other URLs stay as they are.
fn to_proxy(
    reference: &str,
    target: &Url,
    base: &Url,
    proxy_prefix: &str,
    tenant: Option<&str>,
) -> Option<String> {
    let url = target.join(reference.trim()).ok()?;
    let rest = under_base(&url, base)?;
    let mut out = format!("{proxy_prefix}{rest}");
    let mut query: Vec<String> = url.query().map(|q| q.to_owned()).into_iter().collect();
    if let Some(tenant) = tenant {
        query.push(format!(
            "tenant={}",
            url::form_urlencoded::byte_serialize(tenant.as_bytes()).collect::<String>()
        ));
    }
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query.join("&"));
    }
    Some(out)
}

/// Every `<URI-reference>` of a `Link` header through [`to_proxy`].
fn rewrite_links(
    value: &str,
    target: &Url,
    base: &Url,
    proxy_prefix: &str,
    tenant: Option<&str>,
) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let Some(len) = rest[open + 1..].find('>') else {
            break;
        };
        let reference = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..=open]);
        match to_proxy(reference, target, base, proxy_prefix, tenant) {
            Some(proxied) => out.push_str(&proxied),
            None => out.push_str(reference),
        }
        out.push('>');
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
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
/// as it is (status, body, `Link` and other headers; never `Set-Cookie`). GET, POST, PUT,
/// PATCH and DELETE are relayed (what REST APIs and a Copy activity's REST source send);
/// any other method is refused with 405 before anything leaves.
#[utoipa::path(
    method(get, post, put, patch, delete),
    path = "/api/proxy/{connection}/{path}",
    tag = "proxy",
    params(
        ("connection" = String, Path, description = "The connection's name from the config"),
        // One segment as OpenAPI writes a path parameter (the route takes several, separated
        // by `/`): no `.`/`..` segment, no backslash, no control character — those are a 400.
        ("path" = String, Path, pattern = "^[^./\\\\\\u0000-\\u001f\\u007f-\\u009f][^/\\\\\\u0000-\\u001f\\u007f-\\u009f]*$", description = "The path under the connection's api_base_url (several segments separated by `/` in practice); `.`/`..` segments, empty segments, encoded slashes, backslashes and control characters are a 400"),
        ("tenant" = Option<String>, Query, description = "Xero: the organisation (id or name) when the connection was granted several; the broker's parameter, not forwarded"),
    ),
    // Any status can come from the API itself, with any body, so no status is the
    // broker's alone: one `default` answer, described.
    responses(
        (status = "default", description = "The API's own answer, relayed untouched; or the broker's JSON error (ErrorBody): 400 a path that would leave the API or an ambiguous tenant, 401/403 the caller's credential, 404 no such connection, no proxy for it or an unknown tenant, 405 a method not relayed, 409 consent required, 413 a body over 32 MiB, 429 the refresh limit, 502 the API unreachable, 503 store, lease or setup unavailable"),
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
    if !RELAYED_METHODS.contains(&method) {
        // The router sends HEAD to GET's handler; nothing else gets here.
        return Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            "the proxy relays GET, POST, PUT, PATCH and DELETE",
        ));
    }
    state.auth.authenticate(&headers, Role::Caller).await?;
    // Unknown connections answer as /api/refresh does.
    let provider = state
        .broker
        .provider(&connection)
        .map_err(|err| ApiError::from_broker(err, &state))?;
    let Some(base) = state.proxy_bases.get(&connection) else {
        return Err(ApiError::new(ErrorCode::NoProxy, format!("connection `{connection}` has no proxy: set its api_base_url (and proxy is not false)"),
        ));
    };
    let bad_request = |why: String| ApiError::invalid_request(why);
    // The raw path after the route's prefix, as the caller encoded it: refused before
    // anything else happens when it could leave the API.
    let prefix = format!("/api/proxy/{connection}/");
    let rest = uri.path().strip_prefix(&prefix).unwrap_or_default();
    check_path(rest).map_err(|why| bad_request(why.to_owned()))?;
    // `tenant` picks a Xero organisation; it is the broker's parameter, not the API's.
    let (query, tenant) = split_tenant(uri.query());
    let is_xero = provider.kind() == crate::config::ProviderKind::Xero;

    let body = start_body(body).await?;
    let mut forwarded = forwarded_headers(&headers);

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
    let base = resolve_base(base, &record, state.local_mode)?;
    let rest = fill_placeholders(rest, &record.extra).map_err(bad_request)?;
    let target =
        target_url(&base, &rest, query.as_deref()).map_err(|why| bad_request(why.to_owned()))?;
    if is_xero {
        // Xero wants the organisation in `xero-tenant-id` (recorded at consent).
        if let Some(tenant) = record.pick_tenant(tenant.as_deref())? {
            let value = reqwest::header::HeaderValue::from_str(&tenant.id)
                .map_err(|_| bad_request("not a tenant id".to_owned()))?;
            forwarded.insert("xero-tenant-id", value);
        }
    }
    let (replayable, mut streamed) = match body {
        Outgoing::Buffered(bytes) => (Some(bytes), None),
        Outgoing::Streamed(stream) => (None, Some(stream)),
    };
    let send = |record: Arc<TokenRecord>, body: Option<reqwest::Body>| {
        let request = state
            .proxy_http
            .request(method.clone(), target.clone())
            .headers(forwarded.clone());
        let connection = connection.clone();
        async move {
            let Some(access_token) = record.access_token.as_ref() else {
                return Err(ApiError::new(
                    ErrorCode::ConsentRequired,
                    format!("connection `{connection}` has no access token: an admin must consent"),
                ));
            };
            let mut bearer = reqwest::header::HeaderValue::from_str(&format!(
                "Bearer {}",
                access_token.secret()
            ))
            .map_err(|_| ApiError::provider_error("the access token cannot be sent as a header"))?;
            bearer.set_sensitive(true);
            let mut request = request.header(header::AUTHORIZATION, bearer);
            if let Some(body) = body {
                request = request.body(body);
            }
            request.send().await.map_err(|err| {
                if caused_by::<super::deadline::BodyTooSlow>(&err) {
                    return ApiError::invalid_request("the request body could not be read (malformed, or too slow)",
                    );
                }
                if caused_by::<http_body_util::LengthLimitError>(&err) {
                    return ApiError::payload_too_large(format!("the request body is larger than the proxy accepts ({PROXY_MAX_BODY} bytes)"),
                    );
                }
                tracing::warn!(connection = %connection, timeout = err.is_timeout(), "proxied request failed");
                ApiError::new(ErrorCode::ProviderUnavailable, "the provider's API could not be reached or did not answer in time",
                )
            })
        }
    };
    let first_body = match (&replayable, streamed.take()) {
        (Some(bytes), _) if bytes.is_empty() => None,
        (Some(bytes), _) => Some(reqwest::Body::from(bytes.clone())),
        (None, stream) => stream,
    };
    let mut upstream = send(Arc::clone(&record), first_body).await?;
    if upstream.status() == StatusCode::UNAUTHORIZED {
        if let Some(bytes) = replayable {
            // The API refused a token the broker thought valid (revoked, or its clock
            // disagrees): one forced refresh (within the connection's force limit) and one
            // retry — the body is buffered, so it can be sent again. Otherwise the 401 goes
            // back.
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
                    let body = (!bytes.is_empty()).then(|| reqwest::Body::from(bytes));
                    upstream = send(fresh, body).await?;
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(connection = %connection, "the API refused the access token and no new one could be had: {}", err.description);
                }
            }
        }
    }
    let status = upstream.status();
    tracing::info!(connection = %connection, method = %method, status = status.as_u16(), "proxied");
    let proxy_prefix = format!(
        "{}{prefix}",
        state.public_url.as_str().trim_end_matches('/')
    );
    let mut response = Response::builder().status(status).extension(Relayed);
    for (name, value) in upstream.headers() {
        if !returnable_response_header(name) {
            continue;
        }
        // Links into the API point at the proxy instead (see `to_proxy`).
        let rewritten = match (name.as_str(), value.to_str()) {
            ("link", Ok(text)) => Some(rewrite_links(
                text,
                &target,
                &base,
                &proxy_prefix,
                tenant.as_deref(),
            )),
            ("location" | "content-location", Ok(text)) => {
                to_proxy(text, &target, &base, &proxy_prefix, tenant.as_deref())
            }
            _ => None,
        };
        match rewritten.and_then(|text| header::HeaderValue::from_str(&text).ok()) {
            Some(value) => response = response.header(name, value),
            None => response = response.header(name, value),
        }
    }
    response
        .body(Body::from_stream(upstream.bytes_stream()))
        .map_err(|_| ApiError::provider_error("the provider's answer could not be relayed"))
}

/// The most of a request body kept in memory so that the request can be sent again after
/// a `401`; a longer body is streamed to the API as it arrives, and not retried.
const REPLAY_MAX: usize = 64 * 1024;

/// The most a proxied request body may carry (bodies stream; this bounds the upload).
pub(super) const PROXY_MAX_BODY: usize = 32 * 1024 * 1024;

/// A request body on its way to the API.
enum Outgoing {
    /// Short enough to be sent again.
    Buffered(bytes::Bytes),
    /// What was read so far, then the rest as it arrives.
    Streamed(reqwest::Body),
}

/// Reads up to [`REPLAY_MAX`] of `body`: all of it fits (most API calls: none, or a small
/// JSON document) → buffered; otherwise the bytes read and the rest become one stream.
async fn start_body(body: Body) -> Result<Outgoing, ApiError> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let mut body = body;
    let mut read = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(Outgoing::Buffered(read.freeze())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                }
                if read.len() > REPLAY_MAX {
                    let head = futures_util::stream::once(std::future::ready(Ok::<
                        bytes::Bytes,
                        axum::Error,
                    >(
                        read.freeze()
                    )));
                    let stream = head.chain(body.into_data_stream());
                    return Ok(Outgoing::Streamed(reqwest::Body::wrap_stream(stream)));
                }
            }
            Some(Err(_)) => {
                return Err(ApiError::invalid_request(
                    "the request body could not be read (malformed, or too slow)",
                ))
            }
        }
    }
}

/// Whether a failed upload stopped because of the caller's body rather than the API: it
/// went over [`PROXY_MAX_BODY`] (`LengthLimitError`, a chunked body cut while streaming) or
/// missed its deadline (`BodyTooSlow`, `server.body_timeout`).
fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if err.is::<E>() {
            return true;
        }
        cause = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_options_easy_auth_tokens_and_client_addresses_stay_behind() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Hop-Secret"),
            ("x-hop-secret", "1"),
            ("x-ms-token-aad-access-token", "eyJ"),
            ("x-ms-token-aad-id-token", "eyJ"),
            ("x-client-ip", "203.0.113.9"),
            ("xero-tenant-id", "caller-picked"),
            ("accept", "application/json"),
            ("if-none-match", "\"v1\""),
        ] {
            headers.append(
                HeaderName::from_static(name),
                value.parse().expect("header value"),
            );
        }
        let forwarded = forwarded_headers(&headers);
        let names: Vec<&str> = forwarded.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["accept", "if-none-match"]);
    }

    #[test]
    fn the_tenant_parameter_is_the_brokers() {
        assert_eq!(
            split_tenant(Some("page=2&tenant=Demo%20Co&where=a%3Db")),
            (
                Some("page=2&where=a%3Db".to_owned()),
                Some("Demo Co".to_owned())
            )
        );
        assert_eq!(split_tenant(Some("tenant=x")), (None, Some("x".to_owned())));
        assert_eq!(split_tenant(None), (None, None));
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

    #[test]
    fn placeholders_take_the_consents_values_and_nothing_else() {
        let extra = serde_json::json!({"realm_id": "9130355", "division": 1234567, "bad": "a/b"});
        let extra = extra.as_object().expect("map");
        assert_eq!(
            fill_placeholders("v3/company/{realm_id}/query", extra).as_deref(),
            Ok("v3/company/9130355/query")
        );
        assert_eq!(
            fill_placeholders("api/v1/%7Bdivision%7d/x/%7bdivision}", extra).as_deref(),
            Ok("api/v1/1234567/x/1234567")
        );
        assert_eq!(
            fill_placeholders("plain/path%7", extra).as_deref(),
            Ok("plain/path%7")
        );
        assert_eq!(fill_placeholders("a{b", extra).as_deref(), Ok("a{b"));
        assert!(fill_placeholders("{bad}", extra).is_err(), "unknown name");
        assert!(fill_placeholders("{tenant_id}/x", extra).is_err());
        let none = serde_json::Map::new();
        let err = fill_placeholders("{division}", &none).expect_err("not recorded");
        assert!(err.contains("recorded no `division`"), "{err}");
        let hostile = serde_json::json!({"realm_id": "../admin"});
        assert!(fill_placeholders("{realm_id}", hostile.as_object().expect("map")).is_err());
    }

    #[test]
    fn links_into_the_api_point_at_the_proxy_and_others_stay() {
        let base = Url::parse("https://api.example.com/v2").expect("url");
        let target = Url::parse("https://api.example.com/v2/invoices?page=1").expect("url");
        let prefix = "https://broker.example/api/proxy/acme/";
        assert_eq!(
            rewrite_links(
                "<https://api.example.com/v2/invoices?page=2>; rel=\"next\", <https://other.example/v2/x>; rel=\"help\"",
                &target, &base, prefix, None,
            ),
            "<https://broker.example/api/proxy/acme/invoices?page=2>; rel=\"next\", <https://other.example/v2/x>; rel=\"help\""
        );
        // Relative references resolve against the request; the tenant stays chosen.
        assert_eq!(
            rewrite_links(
                "</v2/invoices?page=3>; rel=next",
                &target,
                &base,
                prefix,
                Some("Demo Co")
            ),
            "<https://broker.example/api/proxy/acme/invoices?page=3&tenant=Demo+Co>; rel=next"
        );
        assert_eq!(
            to_proxy("page2", &target, &base, prefix, None).as_deref(),
            Some("https://broker.example/api/proxy/acme/page2")
        );
        // Outside the base path, another port or scheme: untouched.
        for other in [
            "/v1/x",
            "http://api.example.com/v2/x",
            "https://api.example.com:8443/v2/x",
        ] {
            assert_eq!(
                to_proxy(other, &target, &base, prefix, None),
                None,
                "{other}"
            );
        }
        assert_eq!(
            rewrite_links("<unclosed", &target, &base, prefix, None),
            "<unclosed"
        );
    }

    #[test]
    fn an_api_base_from_the_token_response_must_be_https_without_credentials() {
        let record = |url: Option<&str>| TokenRecord {
            status: crate::token::GrantStatus::Connected,
            access_token: None,
            token_type: "Bearer".into(),
            expires_at: None,
            refresh_token: None,
            scope: None,
            extra: url
                .map(|url| serde_json::json!({"instance_url": url}))
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default(),
            obtained_at: chrono::Utc::now(),
            consented_at: chrono::Utc::now(),
            last_error: None,
        };
        let base = ProxyBase::FromRecord("instance_url");
        let ok = resolve_base(
            &base,
            &record(Some("https://acme.my.salesforce.com/")),
            false,
        )
        .expect("https");
        assert_eq!(ok.as_str(), "https://acme.my.salesforce.com/");
        // This machine and internal networks only in local mode.
        for internal in [
            "http://127.0.0.1:8080",
            "https://127.0.0.1:8443",
            "https://localhost",
            "https://10.1.2.3",
            "https://172.16.0.1",
            "https://192.168.1.1",
            "https://169.254.169.254",
            "https://100.64.0.1",
            "https://[::1]",
            "https://[fd00::1]",
            "https://[fe80::1]",
            "https://[::ffff:10.0.0.1]",
            "https://0.0.0.0",
            "https://metadata.google.internal",
        ] {
            assert!(
                resolve_base(&base, &record(Some(internal)), false).is_err(),
                "{internal} accepted outside local mode"
            );
        }
        assert!(
            resolve_base(&base, &record(Some("http://127.0.0.1:8080")), true).is_ok(),
            "loopback in local mode"
        );
        assert!(
            resolve_base(&base, &record(Some("http://192.168.1.1")), true).is_err(),
            "plain http only to this machine, even in local mode"
        );
        for bad in [
            "http://acme.my.salesforce.com",
            "https://user:pw@acme.my.salesforce.com",
            "https://acme.my.salesforce.com/?x=1",
            "not a url",
        ] {
            for local_mode in [false, true] {
                assert!(
                    resolve_base(&base, &record(Some(bad)), local_mode).is_err(),
                    "{bad}"
                );
            }
        }
        assert!(
            resolve_base(&base, &record(None), false).is_err(),
            "none named"
        );
    }
}
