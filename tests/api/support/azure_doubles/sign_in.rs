//! Entra ID's sign-in, as the tenant double plays it for the broker's app registration: the
//! v2.0 `authorize` endpoint (OpenID Connect authorization code flow: `response_type=code`,
//! `scope` with `openid`, `state`, `nonce`, PKCE S256 required, the registered redirect URI
//! only) signs in whichever user the test put at the keyboard, and the `token` endpoint
//! redeems the code once — checking the redirect URI, the client, the PKCE verifier against
//! the challenge, and the client's credential (its secret, or a managed-identity token for
//! `api://AzureADTokenExchange` as a `jwt-bearer` client assertion, as a federated identity
//! credential makes Entra ID accept) — and answers an RS256 id_token signed with the key
//! the tenant's JWKS publishes, carrying `aud` = the client id, the v2 issuer, `tid`, `oid`,
//! `nonce`, `roles`, `exp`/`nbf`. A test can have it forge one claim ([`Forgery`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{random_hex, Shared, TENANT};
use crate::support::entra::sign_with;

/// The audience of a managed-identity token a federated identity credential accepts.
pub const TOKEN_EXCHANGE: &str = "api://AzureADTokenExchange";

/// Who is at the keyboard when the browser reaches the sign-in page.
#[derive(Clone, Debug)]
pub struct User {
    pub object_id: String,
    pub roles: Vec<String>,
    pub name: String,
}

/// One claim of the next id_tokens made wrong, as a forger (or a confused tenant) would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forgery {
    None,
    /// A nonce other than the one the sign-in sent.
    Nonce,
    /// Issued to another application.
    Audience,
    /// Issued by another tenant's authority.
    Issuer,
    /// Signed with a key the tenant does not publish.
    Key,
}

/// How the app registration authenticates at the token endpoint.
#[derive(Clone, Debug)]
pub enum ClientCredential {
    Secret(String),
    /// A managed-identity token for [`TOKEN_EXCHANGE`] (a federated identity credential).
    ManagedIdentity,
}

struct Registration {
    client_id: String,
    redirect_uri: String,
    credential: ClientCredential,
}

struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: String,
    user: User,
}

#[derive(Default)]
struct Inner {
    registration: Option<Registration>,
    user: Option<User>,
    forgery: Option<Forgery>,
    codes: HashMap<String, Grant>,
    /// Token requests answered, and how the client authenticated in each.
    exchanges: Vec<&'static str>,
}

/// The sign-in half of the tenant double; cheap to clone.
#[derive(Clone, Default)]
pub struct SignInDouble {
    inner: Arc<Mutex<Inner>>,
    authority: Arc<Mutex<String>>,
}

impl SignInDouble {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the broker's app: its client id, redirect URI and credential.
    pub fn register(&self, client_id: &str, redirect_uri: &str, credential: ClientCredential) {
        self.lock().registration = Some(Registration {
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            credential,
        });
    }

    /// Who signs in next.
    pub fn user_at_keyboard(&self, user: User) {
        self.lock().user = Some(user);
    }

    /// Makes the next id_tokens wrong in one way.
    pub fn forge(&self, forgery: Forgery) {
        self.lock().forgery = Some(forgery);
    }

    /// How the client authenticated in each token request answered (`secret`,
    /// `managed-identity`).
    pub fn exchanges(&self) -> Vec<&'static str> {
        self.lock().exchanges.clone()
    }

    pub(super) fn set_authority(&self, authority: &str) {
        *self.authority.lock().unwrap_or_else(|p| p.into_inner()) = authority.to_owned();
    }

    fn authority(&self) -> String {
        self.authority
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The two endpoints, for the login host's router.
pub(super) fn routes(shared: Arc<Shared>, double: SignInDouble) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/authorize", get(authorize))
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .with_state((shared, double))
}

fn refuse(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn authorize(
    State((_, double)): State<(Arc<Shared>, SignInDouble)>,
    Path(tenant): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let param = |name: &str| query.get(name).map(String::as_str).unwrap_or_default();
    let mut inner = double.lock();
    let Some(registration) = &inner.registration else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "no app registered",
        );
    };
    // Errors about the client or the redirect URI are shown, never redirected (RFC 6749
    // §4.1.2.1).
    if tenant != TENANT || param("client_id") != registration.client_id {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "AADSTS700016: unknown application",
        );
    }
    if param("redirect_uri") != registration.redirect_uri {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS50011: redirect URI mismatch",
        );
    }
    let checks = [
        (
            param("response_type") == "code",
            "response_type must be code",
        ),
        (
            param("scope").split(' ').any(|s| s == "openid"),
            "scope must include openid",
        ),
        (!param("nonce").is_empty(), "a nonce is required"),
        (
            !param("state").is_empty(),
            "the test double requires a state",
        ),
        (
            param("code_challenge_method") == "S256",
            "PKCE S256 is required",
        ),
        (
            param("code_challenge").len() == 43,
            "a code_challenge is required",
        ),
    ];
    if let Some((_, why)) = checks.iter().find(|(ok, _)| !ok) {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", why);
    }
    let Some(user) = inner.user.clone() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "access_denied",
            "nobody at the keyboard",
        );
    };
    let code = random_hex(24);
    let grant = Grant {
        client_id: param("client_id").to_owned(),
        redirect_uri: param("redirect_uri").to_owned(),
        challenge: param("code_challenge").to_owned(),
        nonce: param("nonce").to_owned(),
        user,
    };
    let target = format!(
        "{}?{}",
        grant.redirect_uri,
        serde_urlencoded::to_string([("code", code.as_str()), ("state", param("state"))])
            .expect("query")
    );
    inner.codes.insert(code, grant);
    Redirect::to(&target).into_response()
}

async fn token(
    State((shared, double)): State<(Arc<Shared>, SignInDouble)>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let param = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    let mut inner = double.lock();
    if tenant != TENANT || param("grant_type") != "authorization_code" {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "authorization_code only",
        );
    }
    let Some(registration) = &inner.registration else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "no app registered",
        );
    };
    if param("client_id") != registration.client_id {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "AADSTS700016: unknown application",
        );
    }
    let how = match &registration.credential {
        ClientCredential::Secret(secret) if param("client_secret") == secret => "secret",
        ClientCredential::ManagedIdentity
            if param("client_assertion_type")
                == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                && shared
                    .lock()
                    .tokens
                    .get(param("client_assertion"))
                    .map(String::as_str)
                    == Some(TOKEN_EXCHANGE) =>
        {
            "managed-identity"
        }
        _ => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "AADSTS7000215: invalid client secret or assertion",
            )
        }
    };
    // A code is redeemed once, whatever happens next.
    let Some(grant) = inner.codes.remove(param("code")) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS70008: unknown or used code",
        );
    };
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(param("code_verifier").as_bytes()));
    if grant.client_id != param("client_id")
        || grant.redirect_uri != param("redirect_uri")
        || challenge != grant.challenge
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS501481: the code verifier does not match",
        );
    }
    inner.exchanges.push(how);
    let forgery = inner.forgery.unwrap_or(Forgery::None);
    let now = chrono::Utc::now().timestamp();
    let authority = double.authority();
    let claims = json!({
        "aud": if forgery == Forgery::Audience { "00000000-0000-4000-8000-0000000000ff" } else { grant.client_id.as_str() },
        "iss": if forgery == Forgery::Issuer {
            format!("{authority}/11111111-2222-4333-8444-555555555555/v2.0")
        } else {
            format!("{authority}/{TENANT}/v2.0")
        },
        "iat": now, "nbf": now, "exp": now + 3600,
        "tid": TENANT,
        "oid": grant.user.object_id,
        "sub": random_hex(16),
        "name": grant.user.name,
        "preferred_username": format!("{}@contoso.example", grant.user.name.to_lowercase()),
        "nonce": if forgery == Forgery::Nonce { "a-nonce-of-another-sign-in".to_owned() } else { grant.nonce.clone() },
        "roles": grant.user.roles,
        "ver": "2.0",
    });
    let id_token: String = if forgery == Forgery::Key {
        sign_with(
            &claims,
            include_bytes!("../../../fixtures/entra-untrusted-key.pem"),
            "a-key-the-tenant-never-published",
        )
    } else {
        sign_with(
            &claims,
            include_bytes!("../../../fixtures/entra-signing-key.pem"),
            "test-key-1",
        )
    };
    let answer: Value = json!({
        "token_type": "Bearer",
        "scope": "openid profile",
        "expires_in": 3600,
        "access_token": format!("graph-{}", random_hex(16)),
        "id_token": id_token,
    });
    ([(header::CACHE_CONTROL, "no-store")], Json(answer)).into_response()
}
