//! Building and running the service: the caller binds the listener (port 0 in tests), the
//! application wires config, store, providers and routes, and serves until told to stop.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use url::Url;

use crate::auth::CallerAuth;
use crate::broker::{Broker, ForceLimit};
use crate::config::{Config, Endpoints};
use crate::http::{self as api, AppState};
use crate::presets;
use crate::provider::{Provider, UpstreamHttp};
use crate::state::StateSigner;
use crate::store;

/// A configured service bound to its listener.
pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
}

impl Application {
    /// Wires everything from `config`. The public URL defaults to `http://localhost:{port}`.
    pub async fn build(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let port = listener.local_addr()?.port();
        let public_url = match config.public_url.clone() {
            Some(url) => url,
            None => Url::parse(&format!("http://localhost:{port}"))?,
        };
        let redirect_uri = Url::parse(&format!(
            "{}/api/callback",
            public_url.as_str().trim_end_matches('/')
        ))?;

        let opened = store::open(&config)?;
        let store = opened.store;
        let http = UpstreamHttp::new(config.refresh.upstream_timeout)
            .context("building the HTTP client")?;
        let mut providers = BTreeMap::new();
        for (name, connection) in &config.connections {
            let client_secret = match (&connection.client_secret_name, &opened.vault) {
                (Some(secret_name), Some(vault)) => Some(
                    vault
                        .read_secret(secret_name)
                        .await
                        .with_context(|| format!("reading connections.{name}.client_secret_name"))?
                        .with_context(|| {
                            format!("connections.{name}.client_secret_name: Key Vault secret `{secret_name}` does not exist")
                        })?,
                ),
                _ => connection.client_secret.clone(),
            };
            let (authorize_url, token_url) = match &connection.endpoints {
                Endpoints::Static {
                    authorize_url,
                    token_url,
                } => (authorize_url.clone(), token_url.clone()),
                Endpoints::Discover { issuer } => {
                    let endpoints = presets::discover(http.client(), issuer)
                        .await
                        .with_context(|| {
                            format!("connections.{name}.issuer: OIDC discovery failed")
                        })?;
                    tracing::info!(connection = %name, issuer = %issuer, "discovered OIDC endpoints");
                    endpoints
                }
            };
            if !connection.added_scopes.is_empty() {
                tracing::info!(connection = %name, provider = connection.provider.name(), added = ?connection.added_scopes, "added scopes the provider needs for a refresh token");
            }
            let provider = Provider::new(
                connection,
                (&authorize_url, &token_url),
                client_secret.as_ref(),
                &redirect_uri,
                config.refresh.default_lifetime,
            );
            providers.insert(name.clone(), provider);
        }

        let auth = CallerAuth::new(&config.auth, http.client())?;
        if auth.is_anonymous() {
            tracing::warn!("!!! auth.allow_anonymous = true: ANYONE who can reach this service can get tokens and start consents. Never use this in production. !!!");
        } else if !auth.has_admins() {
            tracing::warn!(
                "no admin keys or admin principals configured: /api/authorize will refuse everyone"
            );
        }
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let lock = crate::lock::open(&config)?;
        match &config.lock {
            crate::config::LockConfig::Local(_) if config.functions_host => {
                tracing::warn!("no identity-based storage configured (AzureWebJobsStorage__blobServiceUri or __accountName): refreshes are coordinated within this instance only, and two instances refreshing one connection at once can cost a rotating provider's grant");
            }
            crate::config::LockConfig::Local(_) => {
                tracing::info!("refreshes are coordinated within this process only (no storage account configured): run one instance");
            }
            crate::config::LockConfig::Blob(_) => {}
        }
        if config.state_secret.is_none() {
            tracing::info!("no state_secret configured: a random key signs `state`, so consents in progress do not survive a restart and need a single instance");
        }
        tracing::info!(
            store = %store.describe(),
            lock = %lock.describe(),
            public_url = %public_url,
            redirect_uri = %redirect_uri,
            connections = ?providers.keys().collect::<Vec<_>>(),
            "token broker configured"
        );

        let broker = Arc::new(Broker::new(
            providers,
            store,
            (lock, config.lock.timings().clone()),
            http,
            (
                config.refresh.min_validity,
                ForceLimit {
                    burst: config.refresh.force_burst,
                    interval: config.refresh.force_interval,
                },
            ),
            Arc::new(crate::clock::SystemClock),
        ));
        let state = Arc::new(AppState {
            broker,
            auth,
            signer: StateSigner::new(config.state_secret.as_ref()),
            public_url,
            prerefresh_window: config.refresh.prerefresh_window,
            functions_host: config.functions_host,
        });
        Ok(Self { listener, state })
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(port = self.port(), "listening");
        let broker = Arc::clone(&self.state.broker);
        let service =
            api::router(self.state).into_make_service_with_connect_info::<std::net::SocketAddr>();
        let served = axum::serve(self.listener, service)
            .with_graceful_shutdown(shutdown)
            .await;
        // An instance being recycled must not take a refresh token the store has not
        // accepted yet with it.
        broker.flush_pending().await;
        served
    }
}
