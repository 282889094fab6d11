//! OAuth `state` (RFC 6749 §10.12) and PKCE verifiers (RFC 7636), bound to the admin's browser.
//!
//! `/api/authorize` gives the browser a random binding cookie and sends the provider a
//! `state` of the form `v1.{payload}.{mac}`: the payload names the connection, a nonce and an
//! expiry; the MAC (HMAC-SHA256) covers the payload *and* the cookie, so the state only
//! verifies in the browser that started the flow. Each state is accepted once.
//!
//! The PKCE verifier is not stored anywhere: it is derived as HMAC(key, nonce, cookie). The
//! callback re-derives it from the same inputs. So nothing needs to survive between the two
//! requests except the signing key — a restart loses no pending consent when `state_secret`
//! is configured, and several instances with the same key can serve either half.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use oauth2::PkceCodeVerifier;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Name of the browser-binding cookie.
pub const BINDING_COOKIE: &str = "tb_binding";

/// How long a consent may take, from `/api/authorize` to the callback.
pub const STATE_TTL: Duration = Duration::from_secs(600);

/// Name of the admin-session cookie a browser gets for `?key=`.
pub const ADMIN_COOKIE: &str = "tb_admin";

/// How long an admin session lasts.
pub const ADMIN_SESSION_TTL: Duration = Duration::from_secs(1800);

/// Why a `state` was refused. Every variant is a 400 for the browser.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("the sign-in request is missing its `state`")]
    Missing,
    #[error("the browser did not send the sign-in cookie (was the flow started in another browser, or are cookies blocked?)")]
    NoCookie,
    #[error("the `state` is malformed")]
    Malformed,
    #[error("the `state` was not issued to this browser by this broker")]
    BadSignature,
    #[error("the sign-in request expired; start again")]
    Expired,
    #[error("this sign-in response was already used")]
    Replayed,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    /// Connection name.
    c: String,
    /// Random nonce (base64url, 128 bits).
    n: String,
    /// Expiry, Unix seconds.
    e: i64,
    /// Who started a consent (the admin's name, as the audit trail writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    a: Option<String>,
}

/// A freshly issued authorization: the `state` to send and the PKCE verifier it implies.
pub struct Issued {
    pub state: String,
    pub verifier: PkceCodeVerifier,
}

/// A `state` that verified: the connection it was issued for and its PKCE verifier.
pub struct Redeemed {
    pub connection: String,
    pub verifier: PkceCodeVerifier,
    /// The state's random nonce, to record as used across instances. Not a secret: it
    /// travels in the `state` URL, and the verifier also needs the key and the cookie.
    pub nonce: String,
    /// The admin who started the consent, when the state names one.
    pub admin: Option<String>,
}

/// An admin's Entra ID sign-in in flight: what its `state` carries and implies.
pub struct SignIn {
    pub verifier: PkceCodeVerifier,
    /// The OpenID Connect `nonce` the id_token must carry: derived like the verifier, so
    /// only this browser's sign-in yields it.
    pub nonce: String,
    /// Where the browser goes once signed in (a path of this broker).
    pub return_to: String,
}

/// What a `state` is for; each is signed under its own label, so neither redeems as the
/// other.
#[derive(Clone, Copy)]
enum Purpose {
    Consent,
    SignIn,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Consent => b"state",
            Purpose::SignIn => b"sign-in",
        }
    }
}

/// The sign-in's OpenID Connect nonce: HMAC(key, nonce, cookie), base64url.
fn oidc_nonce(key: &[u8], nonce: &str, binding: &str) -> String {
    let mac = keyed(key, &[b"oidc-nonce", nonce.as_bytes(), binding.as_bytes()]);
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// Issues and redeems `state` values.
pub struct StateSigner {
    /// The first signs; every one verifies (the keys of a rotation: new, then old). A
    /// `state` is redeemed with the key that signed it, so its PKCE verifier is the one its
    /// challenge was made from.
    keys: Vec<Vec<u8>>,
    /// What an admin session is bound to besides the key: the admin key set it was
    /// bought with ([`StateSigner::with_session_scope`]), so changing the admin keys ends
    /// every session, on every instance.
    session_scope: Vec<u8>,
    /// Nonces already redeemed, with their expiry; a std Mutex because nothing awaits
    /// while it is held.
    used: Mutex<HashMap<String, i64>>,
}

impl StateSigner {
    /// With the configured keys (the first signs), or a random one when there are none
    /// (then pending consents die with the process).
    pub fn new(secrets: &[SecretString]) -> Self {
        let mut keys: Vec<Vec<u8>> = secrets
            .iter()
            .map(|secret| secret.expose_secret().as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            keys.push(random_bytes(32));
        }
        Self {
            keys,
            session_scope: Vec::new(),
            used: Mutex::new(HashMap::new()),
        }
    }

    /// Binds admin sessions to `scope` (a digest of the admin key set): a session issued
    /// under another scope is refused.
    pub fn with_session_scope(mut self, scope: &[u8]) -> Self {
        self.session_scope = scope.to_vec();
        self
    }

    /// A new random value for the binding cookie.
    pub fn new_binding() -> String {
        URL_SAFE_NO_PAD.encode(random_bytes(32))
    }

    /// True when `value` looks like a binding this broker would issue.
    pub fn is_valid_binding(value: &str) -> bool {
        value.len() == 43 && URL_SAFE_NO_PAD.decode(value).is_ok_and(|b| b.len() == 32)
    }

    /// Issues a `state` for `connection`, bound to the browser holding `binding`.
    pub fn issue(&self, connection: &str, binding: &str, now: DateTime<Utc>) -> Issued {
        self.issue_by(connection, None, binding, now)
    }

    /// [`Self::issue`], naming the `admin` who starts the consent (signed with the rest,
    /// and given back by [`Self::redeem`]).
    pub fn issue_by(
        &self,
        connection: &str,
        admin: Option<&str>,
        binding: &str,
        now: DateTime<Utc>,
    ) -> Issued {
        let (state, nonce) = self.sign(Purpose::Consent, connection, admin, binding, now);
        Issued {
            state,
            verifier: self.verifier(self.signing_key(), &nonce, binding),
        }
    }

    /// Verifies `state` against the browser's binding cookie and marks it used.
    pub fn redeem(
        &self,
        state: Option<&str>,
        binding: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Redeemed, StateError> {
        let (payload, key, binding) = self.open(Purpose::Consent, state, binding, now)?;
        Ok(Redeemed {
            verifier: self.verifier(key, &payload.n, binding),
            connection: payload.c,
            nonce: payload.n,
            admin: payload.a,
        })
    }

    /// Issues the `state` of an admin's Entra ID sign-in, which comes back to `return_to`
    /// (a path of this broker): the `state` to send, and what it implies (its PKCE verifier
    /// and OpenID Connect `nonce`). Signed for this purpose only: it never redeems as a
    /// consent's `state`, nor the reverse.
    pub fn issue_sign_in(
        &self,
        return_to: &str,
        binding: &str,
        now: DateTime<Utc>,
    ) -> (String, SignIn) {
        let (state, nonce) = self.sign(Purpose::SignIn, return_to, None, binding, now);
        let key = self.signing_key();
        let sign_in = SignIn {
            verifier: self.verifier(key, &nonce, binding),
            nonce: oidc_nonce(key, &nonce, binding),
            return_to: return_to.to_owned(),
        };
        (state, sign_in)
    }

    /// Verifies a sign-in's `state` against the browser's binding cookie, marks it used, and
    /// gives back what [`Self::issue_sign_in`] made of it.
    pub fn redeem_sign_in(
        &self,
        state: Option<&str>,
        binding: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<SignIn, StateError> {
        let (payload, key, binding) = self.open(Purpose::SignIn, state, binding, now)?;
        Ok(SignIn {
            verifier: self.verifier(key, &payload.n, binding),
            nonce: oidc_nonce(key, &payload.n, binding),
            return_to: payload.c,
        })
    }

    /// A signed `v1.{payload}.{mac}` naming `subject` (and `admin`), bound to `binding`; and its
    /// nonce.
    fn sign(
        &self,
        purpose: Purpose,
        subject: &str,
        admin: Option<&str>,
        binding: &str,
        now: DateTime<Utc>,
    ) -> (String, String) {
        let payload = Payload {
            c: subject.to_owned(),
            n: URL_SAFE_NO_PAD.encode(random_bytes(16)),
            e: now.timestamp() + STATE_TTL.as_secs() as i64,
            a: admin.map(str::to_owned),
        };
        // Serializing a struct of strings and an integer cannot fail.
        let json = serde_json::to_vec(&payload).unwrap_or_default();
        let payload_b64 = URL_SAFE_NO_PAD.encode(json);
        let mac = URL_SAFE_NO_PAD.encode(self.mac(&[
            purpose.label(),
            payload_b64.as_bytes(),
            binding.as_bytes(),
        ]));
        (format!("v1.{payload_b64}.{mac}"), payload.n)
    }

    /// Checks a `state` signed for `purpose` against the binding cookie, and marks its
    /// nonce used: the payload, the key that signed it, and the binding.
    fn open<'a>(
        &self,
        purpose: Purpose,
        state: Option<&str>,
        binding: Option<&'a str>,
        now: DateTime<Utc>,
    ) -> Result<(Payload, &[u8], &'a str), StateError> {
        let state = state.filter(|s| !s.is_empty()).ok_or(StateError::Missing)?;
        let binding = binding
            .filter(|b| Self::is_valid_binding(b))
            .ok_or(StateError::NoCookie)?;
        let mut parts = state.split('.');
        let (Some("v1"), Some(payload_b64), Some(mac_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(StateError::Malformed);
        };
        let mac = URL_SAFE_NO_PAD
            .decode(mac_b64)
            .map_err(|_| StateError::Malformed)?;
        // `verify_slice` compares in constant time; which key signed is not a secret.
        let key = self
            .keys
            .iter()
            .find(|key| {
                keyed(
                    key,
                    &[purpose.label(), payload_b64.as_bytes(), binding.as_bytes()],
                )
                .verify_slice(&mac)
                .is_ok()
            })
            .ok_or(StateError::BadSignature)?;
        let payload: Payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(StateError::Malformed)?;
        if now.timestamp() >= payload.e {
            return Err(StateError::Expired);
        }
        {
            let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
            let now_ts = now.timestamp();
            used.retain(|_, expiry| *expiry > now_ts);
            if used.insert(payload.n.clone(), payload.e).is_some() {
                return Err(StateError::Replayed);
            }
        }
        Ok((payload, key.as_slice(), binding))
    }

    fn verifier(&self, key: &[u8], nonce: &str, binding: &str) -> PkceCodeVerifier {
        // 32 bytes of MAC → 43 base64url characters, the RFC 7636 §4.1 minimum length.
        let mac = keyed(key, &[b"pkce", nonce.as_bytes(), binding.as_bytes()]);
        PkceCodeVerifier::new(URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    /// The key that signs (the first configured).
    fn signing_key(&self) -> &[u8] {
        // `new` always keeps at least one key.
        self.keys.first().map(Vec::as_slice).unwrap_or_default()
    }

    /// A MAC with the signing key.
    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        keyed(self.signing_key(), parts)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// An admin session for `admin` (a key's name, a signed-in user's object id), for a
    /// browser that presented an admin key or signed in: `v2.{expiry}.{admin}.{nonce}.{mac}`
    /// (the name base64url), signed like `state`, so every instance with the same
    /// `state_secret` accepts it.
    pub fn issue_admin_session(&self, now: DateTime<Utc>, admin: &str) -> String {
        let expiry = (now.timestamp() + ADMIN_SESSION_TTL.as_secs() as i64).to_string();
        let admin = URL_SAFE_NO_PAD.encode(admin);
        let nonce = URL_SAFE_NO_PAD.encode(random_bytes(16));
        let mac = URL_SAFE_NO_PAD.encode(self.mac(&[
            b"admin-session",
            &self.session_scope,
            expiry.as_bytes(),
            admin.as_bytes(),
            nonce.as_bytes(),
        ]));
        format!("v2.{expiry}.{admin}.{nonce}.{mac}")
    }

    /// True for an unexpired admin session this broker issued.
    pub fn is_admin_session(&self, value: &str, now: DateTime<Utc>) -> bool {
        self.admin_session(value, now).is_some()
    }

    /// The admin an unexpired session this broker issued names.
    pub fn admin_session(&self, value: &str, now: DateTime<Utc>) -> Option<String> {
        let mut parts = value.split('.');
        let (Some("v2"), Some(expiry), Some(admin), Some(nonce), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        // Constant-time comparison, through the hmac crate; any configured key.
        let signed = self.keys.iter().any(|key| {
            keyed(
                key,
                &[
                    b"admin-session",
                    &self.session_scope,
                    expiry.as_bytes(),
                    admin.as_bytes(),
                    nonce.as_bytes(),
                ],
            )
            .verify_slice(&mac)
            .is_ok()
        });
        let unexpired = expiry.parse::<i64>().is_ok_and(|e| now.timestamp() < e);
        if !(signed && unexpired) {
            return None;
        }
        String::from_utf8(URL_SAFE_NO_PAD.decode(admin).ok()?).ok()
    }
}

/// HMAC under `key` over length-prefixed parts, so no two different part lists collide.
fn keyed(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> StateSigner {
        StateSigner::new(&[SecretString::from("k".repeat(32))])
    }

    #[test]
    fn round_trip_yields_the_same_verifier() {
        let s = signer();
        let binding = StateSigner::new_binding();
        let now = Utc::now();
        let issued = s.issue("acme", &binding, now);
        let redeemed = s
            .redeem(Some(&issued.state), Some(&binding), now)
            .map_err(|e| e.to_string())
            .expect("redeems");
        assert_eq!(redeemed.connection, "acme");
        assert_eq!(redeemed.verifier.secret(), issued.verifier.secret());
        assert_eq!(issued.verifier.secret().len(), 43);
    }

    #[test]
    fn single_use() {
        let s = signer();
        let b = StateSigner::new_binding();
        let now = Utc::now();
        let issued = s.issue("acme", &b, now);
        assert!(s.redeem(Some(&issued.state), Some(&b), now).is_ok());
        assert_eq!(
            s.redeem(Some(&issued.state), Some(&b), now).err(),
            Some(StateError::Replayed)
        );
    }

    #[test]
    fn other_browser_or_no_cookie_is_refused() {
        let s = signer();
        let now = Utc::now();
        let issued = s.issue("acme", &StateSigner::new_binding(), now);
        let other = StateSigner::new_binding();
        assert_eq!(
            s.redeem(Some(&issued.state), Some(&other), now).err(),
            Some(StateError::BadSignature)
        );
        assert_eq!(
            s.redeem(Some(&issued.state), None, now).err(),
            Some(StateError::NoCookie)
        );
    }

    #[test]
    fn expired_state_is_refused() {
        let s = signer();
        let b = StateSigner::new_binding();
        let then = Utc::now() - chrono::Duration::seconds(601);
        let issued = s.issue("acme", &b, then);
        assert_eq!(
            s.redeem(Some(&issued.state), Some(&b), Utc::now()).err(),
            Some(StateError::Expired)
        );
    }

    #[test]
    fn tampered_payload_and_other_key_are_refused() {
        let s = signer();
        let b = StateSigner::new_binding();
        let now = Utc::now();
        let issued = s.issue("acme", &b, now);
        let forged_payload = URL_SAFE_NO_PAD.encode(r#"{"c":"other","n":"x","e":9999999999}"#);
        let mac = issued.state.rsplit('.').next().expect("mac");
        let forged = format!("v1.{forged_payload}.{mac}");
        assert_eq!(
            s.redeem(Some(&forged), Some(&b), now).err(),
            Some(StateError::BadSignature)
        );
        let other_key = StateSigner::new(&[]);
        assert_eq!(
            other_key.redeem(Some(&issued.state), Some(&b), now).err(),
            Some(StateError::BadSignature)
        );
        assert_eq!(
            s.redeem(Some("garbage"), Some(&b), now).err(),
            Some(StateError::Malformed)
        );
    }

    #[test]
    fn a_rotation_signs_with_the_new_key_and_verifies_with_both() {
        let key = |k: &str| SecretString::from(k.repeat(32));
        let old = StateSigner::new(&[key("o")]);
        let rotating = StateSigner::new(&[key("n"), key("o")]);
        let new = StateSigner::new(&[key("n")]);
        let now = Utc::now();
        let b = StateSigner::new_binding();
        // Begun under the old key, redeemed during the rotation, with the old verifier.
        let issued = old.issue("acme", &b, now);
        let redeemed = rotating
            .redeem(Some(&issued.state), Some(&b), now)
            .expect("old state verifies");
        assert_eq!(redeemed.verifier.secret(), issued.verifier.secret());
        // Issued during the rotation: the new key signed it.
        let issued = rotating.issue("acme", &b, now);
        let redeemed = new
            .redeem(Some(&issued.state), Some(&b), now)
            .expect("new key");
        assert_eq!(redeemed.verifier.secret(), issued.verifier.secret());
        assert!(old.redeem(Some(&issued.state), Some(&b), now).is_err());
        // Sessions: the old one lives through the rotation and ends without the old key.
        let session = old.issue_admin_session(now, "root");
        assert!(rotating.is_admin_session(&session, now));
        assert!(!new.is_admin_session(&session, now));
        assert!(new.is_admin_session(&rotating.issue_admin_session(now, "root"), now));
    }

    #[test]
    fn a_sign_in_state_comes_back_with_its_verifier_nonce_and_page_and_nothing_else() {
        let s = signer();
        let binding = StateSigner::new_binding();
        let now = Utc::now();
        let (state, issued) = s.issue_sign_in("/api/authorize/xero", &binding, now);
        let back = s
            .redeem_sign_in(Some(&state), Some(&binding), now)
            .expect("redeemed");
        assert_eq!(back.return_to, "/api/authorize/xero");
        assert_eq!(back.nonce, issued.nonce);
        assert_eq!(back.verifier.secret(), issued.verifier.secret());
        assert_eq!(
            s.redeem_sign_in(Some(&state), Some(&binding), now).err(),
            Some(StateError::Replayed)
        );

        // Another browser's sign-in has another nonce; neither kind of state redeems as
        // the other.
        let (_, other) = s.issue_sign_in("/api/connections", &StateSigner::new_binding(), now);
        assert_ne!(other.nonce, issued.nonce);
        let (sign_in, _) = s.issue_sign_in("xero", &binding, now);
        assert_eq!(
            s.redeem(Some(&sign_in), Some(&binding), now).err(),
            Some(StateError::BadSignature)
        );
        let consent = s.issue("xero", &binding, now);
        assert_eq!(
            s.redeem_sign_in(Some(&consent.state), Some(&binding), now)
                .err(),
            Some(StateError::BadSignature)
        );
        let (late, _) = s.issue_sign_in("/api/connections", &binding, now);
        assert_eq!(
            s.redeem_sign_in(
                Some(&late),
                Some(&binding),
                now + chrono::Duration::seconds(STATE_TTL.as_secs() as i64)
            )
            .err(),
            Some(StateError::Expired)
        );
    }

    #[test]
    fn sessions_and_consents_name_their_admin() {
        let s = signer();
        let now = Utc::now();
        let session = s.issue_admin_session(now, "6a1f2c3d-0000-4000-8000-0000000ad111");
        assert_eq!(
            s.admin_session(&session, now).as_deref(),
            Some("6a1f2c3d-0000-4000-8000-0000000ad111")
        );
        // The name is signed: another one in its place is refused.
        let mut parts: Vec<&str> = session.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode("break-glass");
        parts[2] = &forged;
        assert_eq!(s.admin_session(&parts.join("."), now), None);
        let later = now + chrono::Duration::seconds(ADMIN_SESSION_TTL.as_secs() as i64);
        assert_eq!(s.admin_session(&session, later), None);

        let binding = StateSigner::new_binding();
        let issued = s.issue_by("xero", Some("break-glass"), &binding, now);
        let redeemed = s
            .redeem(Some(&issued.state), Some(&binding), now)
            .expect("redeemed");
        assert_eq!(redeemed.admin.as_deref(), Some("break-glass"));
        let anonymous = s.issue("xero", &binding, now);
        let redeemed = s
            .redeem(Some(&anonymous.state), Some(&binding), now)
            .expect("redeemed");
        assert_eq!(redeemed.admin, None);
    }
}
