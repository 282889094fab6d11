//! The `[lock]` section: where the per-connection refresh lease lives, and its timings.
//!
//! The storage account is the Function App's own, named by the settings Azure Functions
//! itself uses for an identity-based `AzureWebJobsStorage` connection
//! (`AzureWebJobsStorage__blobServiceUri` or `__accountName`, `__credential`, `__clientId`;
//! see "Connecting to host storage with an identity" in the Azure Functions reference).

use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::values::{parse_base_url, positive_secs};
use super::{ConfigError, CredentialKind};

/// Where refreshes are coordinated across instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockConfig {
    /// This process only: a single instance (local runs, one container).
    Local(LeaseTimings),
    /// An Azure Blob lease per connection, shared by every instance.
    Blob(BlobLockConfig),
}

/// The timings that apply to either kind of lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a caller waits for another instance's refresh before answering 503.
    pub wait: Duration,
    /// The longest a connection rests after failed refreshes: the back-off starts at a
    /// second and grows by 1.6 with each failed flight in a row up to this (`broker::backoff`).
    pub failure_backoff: Duration,
}

/// The blob lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLockConfig {
    /// `https://{account}.blob.core.windows.net` (or Azurite's path-style URL).
    pub blob_service_url: Url,
    /// Container of one small blob per connection; created on first use.
    pub container: String,
    pub credential: CredentialKind,
    /// Client id of a user-assigned managed identity (`AzureWebJobsStorage__clientId`).
    pub managed_identity_client_id: Option<String>,
    /// Lease length (15–60 s); renewed at a third of it while a refresh runs.
    pub lease_duration: Duration,
    pub timings: LeaseTimings,
}

impl LockConfig {
    /// The timings, whichever the kind.
    pub fn timings(&self) -> &LeaseTimings {
        match self {
            LockConfig::Local(timings) => timings,
            LockConfig::Blob(blob) => &blob.timings,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLock {
    /// `auto` (blob when the Functions storage settings are there), `blob` or `local`.
    kind: Option<String>,
    blob_service_url: Option<String>,
    container: Option<String>,
    lease_duration: Option<u64>,
    wait: Option<u64>,
    failure_backoff: Option<u64>,
}

impl RawLock {
    pub(super) fn validate(
        self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<LockConfig, ConfigError> {
        let setting = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let timings = LeaseTimings {
            wait: positive_secs("lock.wait", self.wait.unwrap_or(40))?,
            failure_backoff: positive_secs(
                "lock.failure_backoff",
                self.failure_backoff.unwrap_or(30),
            )?,
        };
        // The file wins over the environment; then the Functions host's own settings.
        let url = match (
            self.blob_service_url,
            setting("AzureWebJobsStorage__blobServiceUri"),
        ) {
            (Some(url), _) => Some(("lock.blob_service_url", url)),
            (None, Some(url)) => Some(("AzureWebJobsStorage__blobServiceUri", url)),
            (None, None) => setting("AzureWebJobsStorage__accountName").map(|account| {
                (
                    "AzureWebJobsStorage__accountName",
                    format!("https://{account}.blob.core.windows.net"),
                )
            }),
        };
        let kind = self.kind.unwrap_or_else(|| "auto".to_owned());
        let url = match (kind.as_str(), url) {
            ("local", _) | ("auto", None) => return Ok(LockConfig::Local(timings)),
            ("blob" | "auto", Some(url)) => url,
            ("blob", None) => return Err(ConfigError::key(
                "lock.blob_service_url",
                "the blob lease needs a storage account: set AzureWebJobsStorage__blobServiceUri \
                     (or __accountName) or lock.blob_service_url",
            )),
            (other, _) => {
                return Err(ConfigError::key(
                    "lock.kind",
                    format!("unknown lock kind `{other}` (expected `auto`, `blob` or `local`)"),
                ))
            }
        };
        let (key, url) = url;
        let blob_service_url = parse_base_url(key, &url)?;
        if blob_service_url.scheme() != "https" {
            return Err(ConfigError::key(
                key,
                "Azure Storage is reached with a bearer token, which only goes over https",
            ));
        }
        let container = self
            .container
            .unwrap_or_else(|| "token-broker-leases".to_owned());
        // Azure's container naming rules: 3-63 of a-z, 0-9 and single `-`, starting and
        // ending with a letter or digit.
        let valid = (3..=63).contains(&container.len())
            && container
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !container.starts_with('-')
            && !container.ends_with('-')
            && !container.contains("--");
        if !valid {
            return Err(ConfigError::key(
                "lock.container",
                "must be 3-63 of a-z, 0-9 and single `-`, starting and ending with a letter or digit",
            ));
        }
        let lease_secs = self.lease_duration.unwrap_or(30);
        if !(15..=60).contains(&lease_secs) {
            return Err(ConfigError::key(
                "lock.lease_duration",
                "must be between 15 and 60 seconds (Azure's limits for a blob lease)",
            ));
        }
        let credential =
            match setting("AzureWebJobsStorage__credential").as_deref() {
                None => CredentialKind::Auto,
                Some(value) if value.eq_ignore_ascii_case("managedidentity") => {
                    CredentialKind::ManagedIdentity
                }
                Some(_) => return Err(ConfigError::key(
                    "AzureWebJobsStorage__credential",
                    "only `managedidentity` is supported (or leave it unset for workload identity \
                     or a developer sign-in)",
                )),
            };
        Ok(LockConfig::Blob(BlobLockConfig {
            blob_service_url,
            container,
            credential,
            managed_identity_client_id: setting("AzureWebJobsStorage__clientId"),
            lease_duration: Duration::from_secs(lease_secs),
            timings,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(raw: RawLock, vars: &[(&str, &str)]) -> Result<LockConfig, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        raw.validate(&move |name: &str| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn local_without_storage_settings() {
        let lock = validate(RawLock::default(), &[]).expect("valid");
        assert!(matches!(lock, LockConfig::Local(_)));
        assert_eq!(lock.timings().wait, Duration::from_secs(40));
    }

    #[test]
    fn functions_storage_settings_select_the_blob_lease() {
        let lock = validate(
            RawLock::default(),
            &[
                ("AzureWebJobsStorage__accountName", "stbroker"),
                ("AzureWebJobsStorage__credential", "managedidentity"),
                ("AzureWebJobsStorage__clientId", "client-1"),
            ],
        )
        .expect("valid");
        let LockConfig::Blob(blob) = lock else {
            panic!("expected the blob lease")
        };
        assert_eq!(
            blob.blob_service_url.as_str(),
            "https://stbroker.blob.core.windows.net/"
        );
        assert_eq!(blob.credential, CredentialKind::ManagedIdentity);
        assert_eq!(blob.managed_identity_client_id.as_deref(), Some("client-1"));
        assert_eq!(blob.container, "token-broker-leases");

        let uri = validate(
            RawLock::default(),
            &[(
                "AzureWebJobsStorage__blobServiceUri",
                "https://127.0.0.1:10000/devstoreaccount1",
            )],
        )
        .expect("valid");
        let LockConfig::Blob(blob) = uri else {
            panic!("expected the blob lease")
        };
        assert_eq!(blob.credential, CredentialKind::Auto);
    }

    #[test]
    fn bad_settings_are_refused_by_key() {
        let http = validate(
            RawLock::default(),
            &[("AzureWebJobsStorage__blobServiceUri", "http://x.example")],
        )
        .expect_err("http");
        assert!(http
            .to_string()
            .contains("AzureWebJobsStorage__blobServiceUri"));
        let blob_without_url = RawLock {
            kind: Some("blob".into()),
            ..Default::default()
        };
        assert!(validate(blob_without_url, &[])
            .expect_err("no url")
            .to_string()
            .contains("lock.blob_service_url"));
        let short = RawLock {
            lease_duration: Some(10),
            ..Default::default()
        };
        let storage = [("AzureWebJobsStorage__accountName", "st")];
        assert!(validate(short, &storage)
            .expect_err("short lease")
            .to_string()
            .contains("lock.lease_duration"));
        let container = RawLock {
            container: Some("Bad_Name".into()),
            ..Default::default()
        };
        assert!(validate(container, &storage)
            .expect_err("container")
            .to_string()
            .contains("lock.container"));
        let credential = [
            ("AzureWebJobsStorage__accountName", "st"),
            ("AzureWebJobsStorage__credential", "connectionstring"),
        ];
        assert!(validate(RawLock::default(), &credential)
            .expect_err("credential")
            .to_string()
            .contains("AzureWebJobsStorage__credential"));
    }
}
