//! Azure plumbing shared by the Azure clients: which credential, and client options (our
//! HTTP client, so `SSL_CERT_FILE` is honoured the same way everywhere; a retry budget).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential,
};

use crate::config::CredentialKind;

/// Client options: the broker's HTTP client and exponential retries (429/5xx/408, honouring
/// `Retry-After`, which azure_core does) that stop after `budget`.
pub fn client_options(budget: Duration) -> anyhow::Result<ClientOptions> {
    let http = crate::http_client::builder()?
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the Azure HTTP client")?;
    let budget = azure_core::time::Duration::try_from(budget).unwrap_or_default();
    Ok(ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(200),
            max_retries: 8,
            max_total_elapsed: budget,
            max_delay: azure_core::time::Duration::seconds(8),
        }),
        ..Default::default()
    })
}

/// The credential for `kind`, with a description for the startup log.
pub fn credential(
    kind: CredentialKind,
    managed_identity_client_id: Option<&str>,
    options: &ClientOptions,
) -> anyhow::Result<(Arc<dyn TokenCredential>, &'static str)> {
    let env = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty());
    let kind = match kind {
        CredentialKind::Auto if env("IDENTITY_ENDPOINT") || env("MSI_ENDPOINT") => {
            CredentialKind::ManagedIdentity
        }
        CredentialKind::Auto if env("AZURE_FEDERATED_TOKEN_FILE") => {
            CredentialKind::WorkloadIdentity
        }
        CredentialKind::Auto => CredentialKind::Developer,
        other => other,
    };
    Ok(match kind {
        CredentialKind::ManagedIdentity => {
            let credential =
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: managed_identity_client_id
                        .map(|id| UserAssignedId::ClientId(id.to_owned())),
                    client_options: options.clone(),
                }))
                .context("setting up the managed identity credential")?;
            (credential, "managed identity")
        }
        CredentialKind::WorkloadIdentity => (
            WorkloadIdentityCredential::new(None)
                .context("setting up the workload identity credential")?,
            "workload identity",
        ),
        CredentialKind::Developer | CredentialKind::Auto => (
            DeveloperToolsCredential::new(None)
                .context("setting up the developer tools credential (Azure CLI / azd)")?,
            "developer tools (Azure CLI / azd)",
        ),
    })
}
