//! Building and running the service: the caller binds the listener (port 0 in tests), the
//! application wires config, store, providers and routes, and serves until told to stop.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use url::Url;

use crate::alert::Alerts;
use crate::auth::CallerAuth;
use crate::broker::{Broker, ConnectionSetup, ForceLimit};
use crate::config::{Config, ConnectionConfig, Endpoints};
use crate::http::{self as api, AppState, LoginGate};
use crate::provider::{Provider, UpstreamHttp};
use crate::state::StateSigner;
use crate::store::{self, KeyVaultStore};

/// A configured service bound to its listener.
pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    limits: crate::config::ServerConfig,
}

impl Application {
    /// Wires everything from `config`. The public URL defaults to `http://localhost:{port}`.
    pub async fn build(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        Self::build_with(config, listener, None).await
    }

    /// The broker for `token-broker login`: the same wiring, serving only `gate`'s
    /// connection's consent (see [`LoginGate`]).
    pub async fn build_for_login(
        config: Config,
        listener: TcpListener,
        gate: LoginGate,
    ) -> anyhow::Result<Self> {
        Self::build_with(config, listener, Some(gate)).await
    }

    async fn build_with(
        config: Config,
        listener: TcpListener,
        login: Option<LoginGate>,
    ) -> anyhow::Result<Self> {
        let port = listener.local_addr()?.port();
        let limits = config.server.clone();
        let state = wire(config, port, login).await?;
        Ok(Self {
            listener,
            state,
            limits,
        })
    }

    /// The broker behind the routes (the CLI's `login` uses it directly).
    pub fn broker(&self) -> Arc<Broker> {
        Arc::clone(&self.state.broker)
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
        match self.listener.local_addr() {
            Ok(address) => tracing::info!(%address, "listening"),
            Err(_) => tracing::info!("listening"),
        }
        let broker = Arc::clone(&self.state.broker);
        let served = api::serve(
            self.listener,
            api::router(Arc::clone(&self.state)),
            self.state,
            &self.limits,
            shutdown,
        )
        .await;
        // An instance being recycled must not take a refresh token the store has not
        // accepted yet with it.
        broker.flush_pending().await;
        served
    }
}

/// The broker without a server, for the CLI's `token` (zero-to-production's split of the
/// wiring from the binding): the same store, lock, providers and coordination as the
/// service, and no port. The public URL (in `consent_required` answers) defaults to
/// `http://localhost:7071`, what `serve` listens on.
pub async fn broker(config: Config) -> anyhow::Result<Arc<Broker>> {
    let state = wire(config, 7071, None).await?;
    Ok(Arc::clone(&state.broker))
}

/// Everything the routes share, wired from `config`. The public URL defaults to
/// `http://localhost:{port}`.
async fn wire(
    mut config: Config,
    port: u16,
    login: Option<LoginGate>,
) -> anyhow::Result<Arc<AppState>> {
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
    let http =
        UpstreamHttp::new(config.refresh.upstream_timeout).context("building the HTTP client")?;
    // One connection's trouble (its client secret not in the vault yet, discovery
    // unreachable) must not take the others or the health route down: it is
    // `misconfigured` and retried in the background until it works.
    let connections = Arc::new(std::mem::take(&mut config.connections));
    let setup = Setup {
        vault: opened.vault.clone(),
        http: http.client().clone(),
        redirect_uri: redirect_uri.clone(),
        default_lifetime: config.refresh.default_lifetime,
    };
    let mut providers = BTreeMap::new();
    for (name, connection) in connections.iter() {
        if !connection.added_scopes.is_empty() {
            tracing::info!(connection = %name, provider = connection.provider.name(), added = ?connection.added_scopes, "added scopes the provider needs for a refresh token");
        }
        let provider = setup.provider(name, connection).await;
        if let Err(reason) = &provider {
            tracing::error!(connection = %name, "connection misconfigured (retried in the background; the others serve): {reason}");
        }
        providers.insert(
            name.clone(),
            ConnectionSetup {
                provider_name: connection.provider.name(),
                provider,
            },
        );
    }

    let auth = CallerAuth::new(&config.auth, http.client())?
        .with_callers(connections.iter().map(|(name, c)| (name, &c.callers)));
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
    let sign_in = match (&config.auth.admin_sign_in, &config.auth.entra) {
        // `login`'s process serves one consent to the browser that holds its key.
        (Some(sign_in), Some(entra)) if login.is_none() => {
            Some(admin_sign_in(sign_in, entra, &public_url, http.clone())?)
        }
        _ => None,
    };
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
    if config.state_secret.is_empty() {
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

    let broker = Arc::new(
        Broker::new(
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
            Alerts::new(
                config.alert_webhook.as_ref(),
                config.alert_webhook_secret.as_ref(),
            )?,
        )
        .with_expiry_warning(config.refresh.expiry_warning),
    );
    tokio::spawn(retry_setups(
        Arc::downgrade(&broker),
        Arc::clone(&connections),
        setup,
    ));
    let proxies = connections
        .iter()
        .filter_map(|(name, c)| Some((name.clone(), c.proxy.clone()?)))
        .collect();
    // The proxy's client: redirects are never followed (a redirect could lead off the
    // connection's API with the token), and a slow API cannot hold a caller forever.
    let proxy_http = crate::http_client::builder()?
        .redirect(reqwest::redirect::Policy::none())
        .read_timeout(std::time::Duration::from_secs(120))
        .build()
        .context("building the proxy's HTTP client")?;
    // Admin sessions end when the admin keys change (on every instance alike).
    let signer =
        StateSigner::new(&config.state_secret).with_session_scope(&auth.admin_generation());
    let state = Arc::new(AppState {
        proxies,
        proxy_http,
        broker,
        auth,
        signer,
        public_url,
        prerefresh_window: config.refresh.prerefresh_window,
        functions_host: config.functions_host,
        local_mode: config.local_mode,
        login,
        audit: crate::audit::Audit::new(config.audit),
        sign_in,
    });
    Ok(state)
}

/// The admins' Entra ID sign-in, with the managed identity as its credential when the
/// config asks for a client assertion.
fn admin_sign_in(
    config: &crate::config::AdminSignInConfig,
    entra: &crate::config::EntraConfig,
    public_url: &Url,
    http: UpstreamHttp,
) -> anyhow::Result<crate::sign_in::AdminSignIn> {
    let identity = match &config.credential {
        crate::config::SignInCredential::ManagedIdentity(client_id) => {
            let options = crate::azure::client_options(std::time::Duration::from_secs(10))?;
            let (credential, _) = crate::azure::credential(
                crate::config::CredentialKind::ManagedIdentity,
                client_id.as_deref(),
                &options,
            )?;
            Some(credential)
        }
        crate::config::SignInCredential::Secret(_) => None,
    };
    let sign_in = crate::sign_in::AdminSignIn::new(config, entra, public_url, http, identity)
        .context("setting up the admins' Entra ID sign-in")?;
    tracing::info!(
        redirect_uri = %format!("{}{}", public_url.as_str().trim_end_matches('/'), crate::sign_in::REDIRECT_PATH),
        "admins sign in with Entra ID"
    );
    Ok(sign_in)
}

/// What setting up a connection's provider needs besides its config.
struct Setup {
    vault: Option<Arc<KeyVaultStore>>,
    http: reqwest::Client,
    redirect_uri: Url,
    default_lifetime: std::time::Duration,
}

impl Setup {
    /// The connection's provider: its client secret (from the vault when named there) and
    /// endpoints (discovered for OIDC). The error says what is wrong, never a secret.
    async fn provider(
        &self,
        name: &str,
        connection: &ConnectionConfig,
    ) -> Result<Provider, String> {
        let client_secret = match (&connection.client_secret_name, &self.vault) {
            (Some(secret_name), Some(vault)) => Some(
                vault
                    .read_secret(secret_name)
                    .await
                    .map_err(|err| format!("reading connections.{name}.client_secret_name: {err}"))?
                    .ok_or_else(|| {
                        format!("Key Vault secret `{secret_name}` (connections.{name}.client_secret_name) does not exist yet: add it to the vault")
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
                let endpoints = crate::provider::discover(&self.http, issuer)
                    .await
                    .map_err(|err| {
                        format!("connections.{name}.issuer: OIDC discovery failed: {err:#}")
                    })?;
                tracing::info!(connection = %name, issuer = %issuer, "discovered OIDC endpoints");
                endpoints
            }
        };
        Ok(Provider::new(
            connection,
            (&authorize_url, &token_url),
            client_secret.as_ref(),
            &self.redirect_uri,
            self.default_lifetime,
        ))
    }
}

/// First retry of a misconfigured connection's setup after this long; doubled after each
/// failure, up to [`SETUP_RETRY_MAX`].
const SETUP_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(5);
const SETUP_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Retries every misconfigured connection's setup with backoff until it works; ends when
/// all work or the broker is gone.
async fn retry_setups(
    broker: std::sync::Weak<Broker>,
    connections: Arc<BTreeMap<String, ConnectionConfig>>,
    setup: Setup,
) {
    let mut pause = SETUP_RETRY_FIRST;
    loop {
        {
            let Some(broker) = broker.upgrade() else {
                return;
            };
            if broker.misconfigured().is_empty() {
                return;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(SETUP_RETRY_MAX);
        let Some(broker) = broker.upgrade() else {
            return;
        };
        for (name, _) in broker.misconfigured() {
            let Some(connection) = connections.get(&name) else {
                continue;
            };
            let result = setup.provider(&name, connection).await;
            match &result {
                Ok(_) => tracing::info!(connection = %name, "connection set up; it serves now"),
                Err(reason) => {
                    tracing::warn!(connection = %name, "connection still misconfigured: {reason}")
                }
            }
            broker.set_up(&name, result);
        }
    }
}
