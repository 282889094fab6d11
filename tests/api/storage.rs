//! The Azurite harness, proven with the official Azure SDK for Rust (`azure_identity`'s
//! `ManagedIdentityCredential` against the managed-identity double, `azure_storage_blob`
//! against Azurite over HTTPS with the test CA): leases, conditional upload and metadata
//! behave as Azure Storage's; Azurite really checks bearer tokens; data survives a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::{NoFormat, Response, StatusCode};
use azure_core::time::OffsetDateTime;
use azure_identity::ManagedIdentityCredential;
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientAcquireLeaseResult,
    BlobClientAcquireLeaseResultHeaders, BlobClientGetPropertiesResultHeaders,
    BlobClientSetMetadataOptions, BlobClientUploadOptions, StorageErrorCode,
};
use azure_storage_blob::{BlobClient, BlobServiceClient, BlobServiceClientOptions, StorageError};
use bytes::Bytes;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::{Mutex, MutexGuard};

use crate::support::azure_doubles::{Azure, TENANT};
use crate::support::azurite::{sdk_client_options, Azurite};

const CONTAINER: &str = "token-broker";

/// `ManagedIdentityCredential` reads `IDENTITY_ENDPOINT` when built and `IDENTITY_HEADER` on
/// every token request, from the process environment. cargo-nextest runs each test in its own
/// process; under `cargo test` this lock keeps storage tests from changing them under each
/// other (nothing else in this binary reads them: brokers run as children with their own env).
static IDENTITY_ENV: Mutex<()> = Mutex::const_new(());

/// The official managed-identity credential, pointed at `azure`'s identity double. Hold the
/// guard while the credential is in use.
async fn managed_identity(
    azure: &Azure,
) -> (Arc<ManagedIdentityCredential>, MutexGuard<'static, ()>) {
    let guard = IDENTITY_ENV.lock().await;
    std::env::set_var("IDENTITY_ENDPOINT", &azure.identity_endpoint);
    std::env::set_var("IDENTITY_HEADER", &azure.identity_header);
    let credential = ManagedIdentityCredential::new(None).expect("managed identity credential");
    (credential, guard)
}

/// A credential that always presents the same token.
#[derive(Debug)]
struct FixedToken(String);

#[async_trait::async_trait]
impl TokenCredential for FixedToken {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            self.0.clone(),
            OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

/// A lease id (Azure wants a GUID).
fn guid() -> String {
    let n: u128 = rand::thread_rng().gen();
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The storage error of a failed call, or a panic naming the call.
fn storage_error<T>(result: azure_core::Result<T>, what: &str) -> StorageError {
    match result {
        Ok(_) => panic!("{what} succeeded; it must fail"),
        Err(err) => StorageError::try_from(err)
            .unwrap_or_else(|err| panic!("{what} failed without a storage error: {err}")),
    }
}

fn assert_code(err: &StorageError, status: StatusCode, code: StorageErrorCode) {
    assert_eq!(err.status_code, status, "{err}");
    assert_eq!(err.error_code.as_ref(), Some(&code), "{err}");
}

async fn create_container(service: &BlobServiceClient) {
    match service.blob_container_client(CONTAINER).create(None).await {
        Ok(_) => {}
        Err(err) => {
            let err = StorageError::try_from(err).expect("a storage error");
            assert_code(
                &err,
                StatusCode::Conflict,
                StorageErrorCode::ContainerAlreadyExists,
            );
        }
    }
}

async fn metadata(blob: &BlobClient) -> HashMap<String, String> {
    blob.get_properties(None)
        .await
        .expect("get properties")
        .metadata()
        .expect("metadata headers")
}

async fn acquire(
    blob: &BlobClient,
    id: &str,
) -> azure_core::Result<Response<BlobClientAcquireLeaseResult, NoFormat>> {
    let options = BlobClientAcquireLeaseOptions {
        proposed_lease_id: Some(id.to_owned()),
        ..Default::default()
    };
    blob.acquire_lease(15, Some(options)).await
}

async fn content(blob: &BlobClient) -> Bytes {
    blob.download(None)
        .await
        .expect("download")
        .body
        .collect()
        .await
        .expect("download body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_conditional_upload_and_metadata_with_managed_identity() {
    let azure = Azure::start().await;
    let azurite = Azurite::start(&azure.pki).await;
    eprintln!("Azurite listened after {:?}", azurite.start_time);
    let (credential, _env) = managed_identity(&azure).await;
    let service = azurite.service_client(credential);

    create_container(&service).await;
    // Again: the second create answers 409 ContainerAlreadyExists, which the helper accepts.
    let again = service.blob_container_client(CONTAINER).create(None).await;
    assert_code(
        &storage_error(again, "creating the container twice"),
        StatusCode::Conflict,
        StorageErrorCode::ContainerAlreadyExists,
    );

    let blob = service.blob_client(CONTAINER, "acme.json");
    let create_if_absent = || Some(BlobClientUploadOptions::default().if_not_exists());
    blob.upload(Bytes::from_static(b"{}").into(), create_if_absent())
        .await
        .expect("create the blob");
    let lost = blob
        .upload(Bytes::from_static(b"{\"x\":1}").into(), create_if_absent())
        .await;
    assert_code(
        &storage_error(lost, "creating an existing blob"),
        StatusCode::Conflict,
        StorageErrorCode::BlobAlreadyExists,
    );

    let mine = guid();
    let theirs = guid();
    let lease = acquire(&blob, &mine).await.expect("acquire the lease");
    assert_eq!(
        lease.lease_id().expect("lease id header"),
        Some(mine.clone())
    );
    assert_code(
        &storage_error(acquire(&blob, &theirs).await, "acquiring a held lease"),
        StatusCode::Conflict,
        StorageErrorCode::LeaseAlreadyPresent,
    );
    // Acquiring again with one's own id renews it.
    acquire(&blob, &mine)
        .await
        .expect("re-acquire with the same id");

    let values = HashMap::from([("refreshed".to_owned(), "1".to_owned())]);
    let without_lease = blob.set_metadata(&values, None).await;
    assert_code(
        &storage_error(without_lease, "writing a leased blob without its lease id"),
        StatusCode::PreconditionFailed,
        StorageErrorCode::LeaseIdMissing,
    );
    let with = |id: &str| {
        Some(BlobClientSetMetadataOptions {
            lease_id: Some(id.to_owned()),
            ..Default::default()
        })
    };
    let stale = blob.set_metadata(&values, with(&theirs)).await;
    assert_code(
        &storage_error(stale, "writing with another lease id"),
        StatusCode::PreconditionFailed,
        StorageErrorCode::LeaseIdMismatchWithBlobOperation,
    );
    blob.set_metadata(&values, with(&mine))
        .await
        .expect("set metadata under the lease");
    assert_eq!(metadata(&blob).await, values, "reads need no lease id");

    blob.release_lease(mine.clone(), None)
        .await
        .expect("release the lease");
    let taken = acquire(&blob, &theirs)
        .await
        .expect("acquire after the release");
    assert_eq!(
        taken.lease_id().expect("lease id header"),
        Some(theirs.clone())
    );
    blob.release_lease(theirs, None).await.expect("release");

    assert_eq!(content(&blob).await, Bytes::from_static(b"{}"));
    assert!(
        azure.shared.count("identity") >= 1,
        "the token came from the managed-identity double"
    );
}

/// A JWT with these claims and a dummy signature (Azurite does not check signatures).
fn jwt(claims: &Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "typ": "JWT"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
    )
}

/// A token from the identity double for `resource`, fetched as the SDK does.
async fn identity_token(azure: &Azure, resource: &str) -> String {
    let url = url::Url::parse_with_params(
        &azure.identity_endpoint,
        [("api-version", "2019-08-01"), ("resource", resource)],
    )
    .expect("identity URL");
    let body: Value = reqwest::Client::new()
        .get(url)
        .header("X-IDENTITY-HEADER", &azure.identity_header)
        .send()
        .await
        .expect("identity request")
        .json()
        .await
        .expect("identity JSON");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_refuses_requests_without_a_storage_token() {
    let azure = Azure::start().await;
    let azurite = Azurite::start(&azure.pki).await;
    let options = || {
        Some(BlobServiceClientOptions {
            client_options: sdk_client_options(&azurite.ca_file),
            ..Default::default()
        })
    };
    let url: azure_core::http::Url = azurite.blob_url.parse().expect("url");

    // No token at all.
    let anonymous = BlobServiceClient::new(url.clone(), None, options()).expect("client");
    let refused = anonymous
        .blob_container_client(CONTAINER)
        .create(None)
        .await;
    assert_code(
        &storage_error(refused, "an anonymous create"),
        StatusCode::Forbidden,
        StorageErrorCode::AuthorizationFailure,
    );

    let now = OffsetDateTime::now_utc().unix_timestamp();
    let issuer = format!("https://sts.windows.net/{TENANT}/");
    let claims = |aud: &str, iss: &str, exp: i64| json!({"aud": aud, "iss": iss, "iat": now - 300, "nbf": now - 300, "exp": exp, "tid": TENANT});
    let refusals = [
        (
            "a Key Vault token from the identity double",
            identity_token(&azure, "https://vault.azure.net").await,
            "Invalid token audience.",
        ),
        (
            "a token from another issuer",
            jwt(&claims(
                "https://storage.azure.com",
                "https://login.example.com/",
                now + 3600,
            )),
            "Invalid token issuer.",
        ),
        (
            "an expired token",
            jwt(&claims("https://storage.azure.com", &issuer, now - 60)),
            "Lifetime validation failed. The token is expired.",
        ),
        (
            "a token that is no JWT",
            "not-a-jwt".to_owned(),
            "Authentication scheme Bearer is not supported.",
        ),
    ];
    for (what, token, detail) in refusals {
        let service =
            BlobServiceClient::new(url.clone(), Some(Arc::new(FixedToken(token))), options())
                .expect("client");
        let err = storage_error(
            service.blob_container_client(CONTAINER).create(None).await,
            what,
        );
        assert_code(
            &err,
            StatusCode::Forbidden,
            StorageErrorCode::AuthenticationFailed,
        );
        assert_eq!(
            err.authentication_error_detail.as_deref(),
            Some(detail),
            "{what}: {err}"
        );
    }

    // The storage token the same double issues is accepted: the refusals were about the token.
    let good = identity_token(&azure, "https://storage.azure.com").await;
    let service =
        BlobServiceClient::new(url, Some(Arc::new(FixedToken(good))), options()).expect("client");
    create_container(&service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_and_metadata_survive_a_restart_and_a_stopped_azurite_fails_fast() {
    let azure = Azure::start().await;
    let mut azurite = Azurite::start(&azure.pki).await;
    let first_start = azurite.start_time;
    let (credential, _env) = managed_identity(&azure).await;
    let service = azurite.service_client(credential);
    create_container(&service).await;
    let blob = service.blob_client(CONTAINER, "kept.json");
    blob.upload(
        Bytes::from_static(b"{\"kept\":true}").into(),
        Some(BlobClientUploadOptions::default().if_not_exists()),
    )
    .await
    .expect("upload");
    let values = HashMap::from([("generation".to_owned(), "7".to_owned())]);
    blob.set_metadata(&values, None)
        .await
        .expect("set metadata");

    let stopping = Instant::now();
    azurite.stop().await;
    let stop_time = stopping.elapsed();
    let calling = Instant::now();
    let err = blob
        .get_properties(None)
        .await
        .expect_err("a stopped Azurite cannot answer");
    assert!(
        err.http_status().is_none(),
        "a connection failure, not an HTTP answer: {err}"
    );
    assert!(
        calling.elapsed() < Duration::from_secs(5),
        "without retries the failure is prompt: {:?}",
        calling.elapsed()
    );

    azurite.start_again().await;
    eprintln!(
        "Azurite listened after {first_start:?}, stopped in {stop_time:?}, listened again after {:?}",
        azurite.start_time
    );
    assert_eq!(metadata(&blob).await, values, "{}", azurite.logs());
    assert_eq!(content(&blob).await, Bytes::from_static(b"{\"kept\":true}"));
}
