//! Token Broker: consent once in a browser, then fresh OAuth 2.0 access tokens from one URL.
//!
//! # Layout
//! - [`config`]: the TOML configuration, `${NAME}` expansion, validation at boot.
//! - [`presets`]: what `provider = "xero"` etc. mean: endpoints, auth style, quirks.
//! - [`provider`]: a configured provider and its token requests (through the `oauth2` crate).
//! - [`state`]: signed, browser-bound, single-use `state` and derived PKCE verifiers.
//! - [`broker`]: refresh coordination: cache, single flight, the lease protocol, rotation,
//!   dead-grant detection, back-off, consent, the timer pass.
//! - [`clock`]: the time, injected (system clock in production, a manual one in tests).
//! - [`token`]: the stored record per connection and the `/api/refresh` answer.
//! - [`store`]: the token store trait, the local file store and the Key Vault store.
//! - [`alert`]: connection state changes, as a log event alert rules match and an optional
//!   webhook notification.
//! - [`audit`]: the audit trail of tokens handed out and refused.
//! - [`lock`]: the refresh lease per connection (in-process, or an Azure Blob lease).
//! - [`azure`]: Azure credentials and client options for the Azure SDK clients.
//! - [`auth`]: caller authentication (API keys, Entra ID bearer tokens via [`entra`]).
//! - [`sign_in`]: admins signing in with Entra ID in the browser (OpenID Connect).
//! - [`http`]: the router, one module per route group, and the error-to-response mapping.
//! - [`html`]: the small pages a browser sees.
//! - [`http_client`]: outgoing HTTPS trust (system roots plus `SSL_CERT_FILE`) and `BROKER_RESOLVE`.
//! - [`app`]: wiring and serving; [`telemetry`]: tracing setup.
//!
//! Dependencies point one way: `app → http → {auth, html, sign_in} → broker → {store, lock, provider,
//! entra, state, alert, audit} → {azure, http_client, token, clock} → config → presets` (ARCHITECTURE.md;
//! checked by `tests/api/architecture.rs`).

pub mod alert;
pub mod app;
pub mod audit;
pub mod auth;
pub mod azure;
pub mod broker;
pub mod clock;
pub mod config;
pub mod entra;
pub mod html;
pub mod http;
pub mod http_client;
pub mod lock;
pub mod presets;
pub mod provider;
pub mod sign_in;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod token;

pub use app::Application;
pub use config::Config;
