//! Admin authentication for the browser and admin routes: a bearer token, `X-API-Key`, or
//! the admin-session cookie a browser gets in exchange for `?key=` or by signing in with
//! Entra ID (`sign_in`).
//!
//! A key in a URL lands in the browser's history and in request logs, so `?key=` is taken
//! only on the browser routes (`/api/authorize/…`, `/api/connections`), and only once: the
//! answer sets a short-lived `HttpOnly`, `SameSite=Strict` session cookie (`Secure` when the
//! public URL is https) and sends the browser on to the same address without the key.

use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};

use super::{ApiError, AppState};
use crate::auth::{AuthError, Role};
use crate::html;
use crate::state::{StateSigner, ADMIN_COOKIE, ADMIN_SESSION_TTL, BINDING_COOKIE, STATE_TTL};

/// What `token-broker login` admits: one browser, once, to one connection's consent.
///
/// Its key is not an admin key. It is good for exactly one `?key=` exchange on
/// `/api/authorize/{connection}` — never as `X-API-Key`, never on another route — and the
/// session it buys is signed with the login process's own random key, so no instance that
/// shares the deployment's `state_secret` accepts it.
pub struct LoginGate {
    connection: String,
    digest: [u8; 32],
    spent: AtomicBool,
}

impl LoginGate {
    pub fn new(connection: &str, key: &SecretString) -> Self {
        Self {
            connection: connection.to_owned(),
            digest: crate::auth::digest(key.expose_secret()),
            spent: AtomicBool::new(false),
        }
    }

    /// The connection this login is for.
    pub fn connection(&self) -> &str {
        &self.connection
    }

    /// Whether `presented` on `path` is the one exchange this gate allows (and spends it).
    fn admit(&self, path: &str, presented: &str) -> bool {
        // Compared as the caller keys are: digests, in constant time.
        let right_key = crate::auth::contains(&[self.digest], &crate::auth::digest(presented));
        path.strip_prefix("/api/authorize/") == Some(self.connection.as_str())
            && right_key
            && !self.spent.swap(true, Ordering::SeqCst)
    }
}

/// Admin routes: a bearer token, `X-API-Key`, or an admin-session cookie. The admin's name
/// (the key's, the principal's object id, the one the session names) is returned.
pub(super) async fn authenticate_admin(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    Ok(admin_of(state, headers).await?)
}

/// [`authenticate_admin`], with the reason for a refusal as authentication gave it.
async fn admin_of(state: &AppState, headers: &HeaderMap) -> Result<String, AuthError> {
    let session = cookie(headers, &state.cookie_name(ADMIN_COOKIE))
        .and_then(|session| state.signer.admin_session(session, state.broker.now()));
    if let Some(admin) = session {
        return Ok(admin);
    }
    let caller = state.auth.authenticate(headers, Role::Admin).await?;
    Ok(caller.name().to_owned())
}

/// How a browser route's request is admitted.
pub(super) enum Admission {
    /// An admin, by name.
    Admin(String),
    /// An answer to send instead: the `?key=` exchange, or the way to sign in.
    Answer(Response),
}

/// The browser routes' admission: a `?key=` is exchanged at once (the answer to send is
/// returned), a browser without credentials is sent to sign in when admins sign in with
/// Entra ID, otherwise the caller must be an admin.
pub(super) async fn admit_browser_admin(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Admission, ApiError> {
    if let Some(exchanged) = exchange_query_key(state, uri)? {
        return Ok(Admission::Answer(exchanged));
    }
    match admin_of(state, headers).await {
        Ok(admin) => Ok(Admission::Admin(admin)),
        // No credential at all (a wrong one stays a 401): maybe a browser to sign in.
        Err(AuthError::Missing) => super::sign_in::redirect_unsigned(state, uri, headers)
            .map(Admission::Answer)
            .ok_or_else(|| AuthError::Missing.into()),
        Err(err) => Err(err.into()),
    }
}

/// The browser's binding cookie (`state` is bound to it), or a new one, with the
/// `Set-Cookie` that keeps it through the provider's or Entra ID's redirect back: `Lax`,
/// because that redirect is a cross-site navigation, which `Strict` cookies miss.
pub(super) fn browser_binding(state: &AppState, headers: &HeaderMap) -> (String, String) {
    let binding = cookie(headers, &state.cookie_name(BINDING_COOKIE))
        .filter(|b| StateSigner::is_valid_binding(b))
        .map(str::to_owned)
        .unwrap_or_else(StateSigner::new_binding);
    let set_cookie = format!(
        "{}={binding}; Max-Age={}; HttpOnly; SameSite=Lax{}",
        state.cookie_name(BINDING_COOKIE),
        STATE_TTL.as_secs(),
        state.cookie_scope()
    );
    (binding, set_cookie)
}

/// A browser route opened with `?key=`: checks the key and answers with the session cookie
/// and a page that goes on to the same address without it. `None` when there is no key.
fn exchange_query_key(state: &AppState, uri: &Uri) -> Result<Option<Response>, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
    let (keys, rest): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(name, _)| name == "key");
    let Some((_, key)) = keys.into_iter().next() else {
        return Ok(None);
    };
    let admin = match &state.login {
        // `login`'s process: only its one-time key, once, on its connection's consent.
        Some(gate) => {
            if !gate.admit(uri.path(), &key) {
                return Err(AuthError::Invalid.into());
            }
            "login".to_owned()
        }
        None => state
            .auth
            .check_key(Some(&key), Role::Admin)?
            .name()
            .to_owned(),
    };
    let target = match serde_urlencoded::to_string(&rest) {
        Ok(rest) if !rest.is_empty() => format!("{}?{rest}", uri.path()),
        _ => uri.path().to_owned(),
    };
    let cookie = session_cookie(state, &admin);
    tracing::info!(
        path = uri.path(),
        "admin key exchanged for a session cookie"
    );
    Ok(Some(
        (
            StatusCode::OK,
            [
                (header::SET_COOKIE, cookie),
                (header::CACHE_CONTROL, "no-store".to_owned()),
                // The address that brought the browser here holds the key.
                (header::REFERRER_POLICY, "no-referrer".to_owned()),
            ],
            Html(html::continue_to(&target)),
        )
            .into_response(),
    ))
}

/// A new admin session for `admin`, as the `Set-Cookie` value: `HttpOnly`,
/// `SameSite=Strict`, scoped as [`AppState::cookie_scope`] says.
pub(super) fn session_cookie(state: &AppState, admin: &str) -> String {
    let session = state.signer.issue_admin_session(state.broker.now(), admin);
    format!(
        "{}={session}; Max-Age={}; HttpOnly; SameSite=Strict{}",
        state.cookie_name(ADMIN_COOKIE),
        ADMIN_SESSION_TTL.as_secs(),
        state.cookie_scope()
    )
}

/// The value of cookie `name` in the request, if any.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}
