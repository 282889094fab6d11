//! A local double of a commercial OAuth provider, behaving like Xero, Exact Online,
//! QuickBooks or Salesforce on the points the presets must get right: the client
//! authentication style it accepts, refresh-token rotation (a used refresh token is dead),
//! Exact Online's minimum refresh interval and string `expires_in`, Salesforce's missing
//! `expires_in` and `instance_url`, QuickBooks' `realmId` on the redirect, and the
//! post-consent lookups (Xero `/connections`, Exact `/api/v1/current/Me`). It records every
//! request so tests can compare them with the providers' documented formats.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use serde_json::{json, Value};

use crate::support::{random, Options};

/// How the provider behaves.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// Client credentials only in a Basic header (else only in the body).
    pub basic_auth: bool,
    /// `expires_in` as a string, like Exact Online.
    pub expires_in_as_string: bool,
    /// No `expires_in` at all, like Salesforce.
    pub no_expires_in: bool,
    /// Fields added to every token response (e.g. Salesforce `instance_url`).
    pub token_extras: Value,
    /// Query parameters added to the redirect (e.g. QuickBooks `realmId`).
    pub redirect_extras: Vec<(&'static str, &'static str)>,
    /// A refresh sooner than this after the last token is refused, like Exact Online.
    pub min_refresh_interval_secs: Option<i64>,
    pub access_token_lifetime: u64,
    /// Issue no refresh token (Google on a repeated consent without prompt=consent).
    pub no_refresh_token: bool,
    /// Xero organisations granted, as (tenantId, tenantName); empty: the one
    /// documented example organisation.
    pub xero_tenants: Vec<(&'static str, &'static str)>,
}

/// One request to the token endpoint, as received.
#[derive(Clone, Debug)]
pub struct TokenCall {
    pub content_type: String,
    /// (client_id, client_secret) from a Basic header, decoded per RFC 6749 §2.3.1.
    pub basic: Option<(String, String)>,
    pub form: HashMap<String, String>,
}

#[derive(Default)]
struct Inner {
    authorize_requests: Vec<HashMap<String, String>>,
    token_calls: Vec<TokenCall>,
    codes: HashMap<String, String>,
    live_refresh_tokens: Vec<String>,
    live_access_tokens: Vec<String>,
    last_issued: Option<i64>,
    /// Seconds added to the double's clock (to pass Exact's minimum interval).
    clock_offset: i64,
    /// Answer the next refresh (after rotating) with a malformed body that still names the
    /// new refresh token, labelled text/plain.
    malform_next_refresh: bool,
    lookups: u64,
    /// Calls to the Xero API (`/api.xro/2.0/…`): the `xero-tenant-id` each carried.
    xero_api_tenants: Vec<Option<String>>,
}

/// The running double. Dropping it stops the server.
pub struct ProviderDouble {
    pub url: String,
    pub client_id: String,
    pub client_secret: String,
    state: Arc<DoubleState>,
    handle: axum_server::Handle<std::net::SocketAddr>,
}

struct DoubleState {
    behaviour: Behaviour,
    client_id: String,
    client_secret: String,
    inner: Mutex<Inner>,
}

impl DoubleState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ProviderDouble {
    pub async fn start(behaviour: Behaviour) -> Self {
        let state = Arc::new(DoubleState {
            behaviour,
            client_id: "double-client".into(),
            // Characters that RFC 6749 §2.3.1 form-encoding changes in a Basic header.
            client_secret: format!("{}+/=:%", random("double-secret")),
            inner: Mutex::new(Inner::default()),
        });
        let router = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/connections", get(xero_connections))
            .route("/api/v1/current/Me", get(exact_me))
            .route("/api.xro/2.0/Invoices", get(xero_invoices))
            .with_state(state.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp(listener)
            .expect("server")
            .handle(handle.clone());
        tokio::spawn(server.serve(router.into_make_service()));
        Self {
            url: format!("http://127.0.0.1:{port}"),
            client_id: state.client_id.clone(),
            client_secret: state.client_secret.clone(),
            state,
            handle,
        }
    }

    pub fn authorize_requests(&self) -> Vec<HashMap<String, String>> {
        self.state.lock().authorize_requests.clone()
    }

    pub fn token_calls(&self) -> Vec<TokenCall> {
        self.state.lock().token_calls.clone()
    }

    pub fn lookups(&self) -> u64 {
        self.state.lock().lookups
    }

    /// The `xero-tenant-id` of each accepted call to the Xero API, in order.
    pub fn xero_api_tenants(&self) -> Vec<Option<String>> {
        self.state.lock().xero_api_tenants.clone()
    }

    /// The next refresh rotates, then answers malformed JSON carrying the new refresh token.
    pub fn malform_next_refresh(&self) {
        self.state.lock().malform_next_refresh = true;
    }

    /// Moves the double's clock forward.
    pub fn advance(&self, secs: i64) {
        self.state.lock().clock_offset += secs;
    }
}

impl Drop for ProviderDouble {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn authorize(
    State(state): State<Arc<DoubleState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let code = random("code");
    let redirect = query.get("redirect_uri").cloned().unwrap_or_default();
    let mut target = url::Url::parse(&redirect).expect("redirect_uri");
    target
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair(
            "state",
            query.get("state").map(String::as_str).unwrap_or_default(),
        );
    for (k, v) in &state.behaviour.redirect_extras {
        target.query_pairs_mut().append_pair(k, v);
    }
    let mut inner = state.lock();
    inner.codes.insert(
        code,
        query.get("code_challenge").cloned().unwrap_or_default(),
    );
    inner.authorize_requests.push(query);
    Redirect::to(target.as_str()).into_response()
}

fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn token(
    State(state): State<Arc<DoubleState>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| {
            pair.split_once(':')
                .map(|(id, secret)| (form_decode(id), form_decode(secret)))
        });
    let call = TokenCall {
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        basic: basic.clone(),
        form: form.clone(),
    };
    let behaviour = &state.behaviour;
    let mut inner = state.lock();
    inner.token_calls.push(call);

    // Client authentication, in the one style this provider accepts.
    let body_creds = (form.get("client_id"), form.get("client_secret"));
    let authenticated = if behaviour.basic_auth {
        body_creds.1.is_none()
            && basic.as_ref() == Some(&(state.client_id.clone(), state.client_secret.clone()))
    } else {
        basic.is_none()
            && body_creds.0 == Some(&state.client_id)
            && body_creds.1 == Some(&state.client_secret)
    };
    if !authenticated {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }

    let now = chrono::Utc::now().timestamp() + inner.clock_offset;
    match form.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let Some(challenge) = form.get("code").and_then(|c| inner.codes.remove(c)) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "unknown or used code",
                );
            };
            // PKCE: the verifier must hash to the challenge sent to /authorize.
            let verifier = form.get("code_verifier").cloned().unwrap_or_default();
            let digest = {
                use sha2::Digest;
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(sha2::Sha256::digest(verifier.as_bytes()))
            };
            if !challenge.is_empty() && digest != challenge {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "PKCE verification failed",
                );
            }
        }
        Some("refresh_token") => {
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            let Some(pos) = inner
                .live_refresh_tokens
                .iter()
                .position(|t| *t == presented)
            else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "refresh token is invalid or was already used",
                );
            };
            if let (Some(min), Some(last)) =
                (behaviour.min_refresh_interval_secs, inner.last_issued)
            {
                if now - last < min {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "access token not expired yet; refresh later",
                    );
                }
            }
            // Rotation: the presented refresh token is spent.
            inner.live_refresh_tokens.remove(pos);
        }
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "unsupported grant type",
            )
        }
    }

    let access_token = random("double-access");
    let refresh_token = random("double-refresh");
    inner.live_access_tokens.push(access_token.clone());
    inner.last_issued = Some(now);
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
    });
    if !behaviour.no_refresh_token {
        inner.live_refresh_tokens.push(refresh_token.clone());
        body["refresh_token"] = refresh_token.into();
    }
    if !behaviour.no_expires_in {
        let lifetime = behaviour.access_token_lifetime.max(1);
        body["expires_in"] = if behaviour.expires_in_as_string {
            lifetime.to_string().into()
        } else {
            lifetime.into()
        };
    }
    if form.get("grant_type").map(String::as_str) == Some("refresh_token")
        && std::mem::take(&mut inner.malform_next_refresh)
    {
        body["access_token"] = json!(12345);
        return ([("content-type", "text/plain")], body.to_string()).into_response();
    }
    if let Some(extras) = behaviour.token_extras.as_object() {
        for (k, v) in extras {
            body[k] = v.clone();
        }
    }
    Json(body).into_response()
}

/// Only tokens the double issued open its API.
fn bearer_ok(state: &DoubleState, headers: &HeaderMap) -> bool {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let mut inner = state.lock();
    inner.lookups += 1;
    token.is_some_and(|t| inner.live_access_tokens.iter().any(|live| live == t))
}

async fn xero_connections(State(state): State<Arc<DoubleState>>, headers: HeaderMap) -> Response {
    if !bearer_ok(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    // Shape from https://developer.xero.com/documentation/guides/oauth2/auth-flow/#5-check-the-tenants-youre-authorized-to-access
    let tenants = if state.behaviour.xero_tenants.is_empty() {
        vec![("70784a63-d24b-46a9-a4db-0e70a274b056", "Maple Florist")]
    } else {
        state.behaviour.xero_tenants.clone()
    };
    let connections: Vec<Value> = tenants
        .iter()
        .map(|(id, name)| {
            json!({
                "id": "e1eede29-f875-4a5d-8470-17f6a29a88b1",
                "authEventId": "d99ecdfe-391d-43d2-b834-17636ba90e8d",
                "tenantId": id,
                "tenantType": "ORGANISATION",
                "tenantName": name,
                "createdDateUtc": "2019-07-09T23:40:30.1833130",
                "updatedDateUtc": "2020-05-15T01:35:13.8491980"
            })
        })
        .collect();
    Json(Value::Array(connections)).into_response()
}

/// Xero's accounting API: a bearer token the double issued and a `xero-tenant-id` of a
/// granted organisation, or 401/403 as Xero answers
/// (https://developer.xero.com/documentation/guides/oauth2/troubleshooting).
/// Two pages of invoices (`?page=1`, `?page=2`), then empty pages, as Xero pages
/// (https://developer.xero.com/documentation/api/accounting/invoices: `page`, up to 100 a
/// page).
async fn xero_invoices(
    State(state): State<Arc<DoubleState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !bearer_ok(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let tenant = headers
        .get("xero-tenant-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let granted = if state.behaviour.xero_tenants.is_empty() {
        vec!["70784a63-d24b-46a9-a4db-0e70a274b056"]
    } else {
        state
            .behaviour
            .xero_tenants
            .iter()
            .map(|(id, _)| *id)
            .collect()
    };
    state.lock().xero_api_tenants.push(tenant.clone());
    match tenant {
        Some(tenant) if granted.contains(&tenant.as_str()) => {
            let page: u32 = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
            let invoices: Vec<Value> = if page <= 2 {
                vec![json!({"InvoiceNumber": format!("INV-{page}"), "Tenant": tenant})]
            } else {
                Vec::new()
            };
            Json(json!({"Invoices": invoices})).into_response()
        }
        _ => (
            StatusCode::FORBIDDEN,
            Json(json!({"Title": "Forbidden", "Detail": "AuthenticationUnsuccessful"})),
        )
            .into_response(),
    }
}

async fn exact_me(State(state): State<Arc<DoubleState>>, headers: HeaderMap) -> Response {
    if !bearer_ok(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    Json(json!({"d": {"results": [{
        "__metadata": {"uri": "https://start.exactonline.nl/api/v1/current/Me(guid'…')", "type": "Exact.Web.Api.System.Me"},
        "CurrentDivision": 1_234_567
    }]}}))
    .into_response()
}

/// Options for a broker whose connection `name` (with `settings`, e.g. its `provider`)
/// talks to `double` instead of the provider.
pub fn against_double(name: &str, settings: &str, double: &ProviderDouble) -> Options {
    Options {
        extra_config: super::connection_table(
            name,
            &super::settings(&[
                ("authorize_url", &format!("{}/authorize", double.url)),
                ("token_url", &format!("{}/token", double.url)),
                ("client_id", &double.client_id),
                ("client_secret", &double.client_secret),
            ]),
            settings,
        ),
        ..Default::default()
    }
}

/// A Xero double granting `tenants` (none: the one documented example organisation), and the
/// options of a broker whose connection `xero` uses it for OAuth and for the API.
pub async fn xero(tenants: Vec<(&'static str, &'static str)>) -> (ProviderDouble, Options) {
    let double = ProviderDouble::start(Behaviour {
        basic_auth: true,
        access_token_lifetime: 1800,
        xero_tenants: tenants,
        ..Default::default()
    })
    .await;
    let options = against_double(
        "xero",
        &format!("provider = \"xero\"\napi_url = \"{}\"", double.url),
        &double,
    );
    (double, options)
}
