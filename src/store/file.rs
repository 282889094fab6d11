//! The local file store: one JSON file per connection, written atomically, owner-only.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;

use super::{StoreError, TokenStore};
use crate::token::TokenRecord;

/// Keeps `{dir}/{connection}.json`. Connection names are validated by the config
/// (`[A-Za-z0-9_-]`), so they are safe as file names.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// Opens (creating if needed, mode 0700) the store directory.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating token directory {}", dir.display()))?;
        restrict_dir(dir).with_context(|| format!("restricting {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path_of(&self, connection: &str) -> PathBuf {
        self.dir.join(format!("{connection}.json"))
    }

    /// Write to a temp file in the same directory, fsync it, rename over the old file and
    /// fsync the directory: a crash leaves either the old record or the new one, never half.
    fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .suffix(".json")
            .tempfile_in(dir)?;
        // tempfile creates files 0600 on Unix already; say so explicitly all the same.
        restrict_file(tmp.path())?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|err| err.error)?;
        sync_dir(dir)
    }
}

#[async_trait]
impl TokenStore for FileStore {
    async fn load(&self, connection: &str) -> Result<Option<TokenRecord>, StoreError> {
        let path = self.path_of(connection);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(StoreError::Unavailable(format!(
                    "reading {}: {err}",
                    path.display()
                )))
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| StoreError::corrupt(connection, &path.display().to_string(), &err))
    }

    async fn save(&self, connection: &str, record: &TokenRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|err| StoreError::Unavailable(format!("encoding record: {err}")))?;
        let dir = self.dir.clone();
        let path = self.path_of(connection);
        tokio::task::spawn_blocking(move || {
            Self::write_atomically(&dir, &path, &bytes).map_err(|err| {
                StoreError::Unavailable(format!("writing {}: {err}", path.display()))
            })
        })
        .await
        .map_err(|err| StoreError::Unavailable(format!("writer task failed: {err}")))?
    }

    fn describe(&self) -> String {
        format!("file store in {}", self.dir.display())
    }
}

#[cfg(unix)]
fn restrict_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(unix)]
fn restrict_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

// Windows has no owner-only mode bits; the profile directory's ACLs apply there.
#[cfg(not(unix))]
fn restrict_dir(_: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(not(unix))]
fn restrict_file(_: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::GrantStatus;
    use chrono::Utc;
    use oauth2::{AccessToken, RefreshToken};

    fn record(refresh: &str) -> TokenRecord {
        TokenRecord {
            status: GrantStatus::Connected,
            access_token: Some(AccessToken::new("at".into())),
            token_type: "Bearer".into(),
            expires_at: Some(Utc::now()),
            refresh_token: Some(RefreshToken::new(refresh.into())),
            scope: None,
            facts: Default::default(),
            obtained_at: Utc::now(),
            consented_at: Utc::now(),
            last_error: None,
        }
    }

    #[tokio::test]
    async fn round_trips_and_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(&dir.path().join("tokens")).expect("open");
        assert!(store.load("acme").await.expect("load").is_none());
        store.save("acme", &record("one")).await.expect("save");
        store.save("acme", &record("two")).await.expect("save");
        let loaded = store.load("acme").await.expect("load").expect("present");
        assert_eq!(loaded.refresh_token.expect("rt").secret(), "two");
        // Only the record itself is left behind: no temp files.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("tokens"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("acme.json")]);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        let store = FileStore::open(&tokens).expect("open");
        store.save("acme", &record("one")).await.expect("save");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&tokens), 0o700);
        assert_eq!(mode(&tokens.join("acme.json")), 0o600);
    }

    #[tokio::test]
    async fn corrupt_file_is_an_error_not_a_missing_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("open");
        std::fs::write(dir.path().join("acme.json"), b"{ not json").expect("write");
        assert!(matches!(
            store.load("acme").await,
            Err(StoreError::Corrupt { .. })
        ));
    }
}
