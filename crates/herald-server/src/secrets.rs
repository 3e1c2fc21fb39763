//! Secrets for a node started without a config file: generated once, kept in the data
//! folder (mode 0600) so that the CLI and later starts use the same API key and token secret.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};

pub const SECRETS_FILE: &str = "secrets.toml";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratedSecrets {
    pub api_key: String,
    pub hmac_secret: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot use data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secrets file {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A random alphanumeric string of `len` characters.
pub fn random_secret(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

impl GeneratedSecrets {
    pub fn generate() -> Self {
        Self {
            api_key: random_secret(32),
            hmac_secret: random_secret(48),
        }
    }

    /// Reads `<dir>/secrets.toml` if it exists.
    pub fn load(dir: &Path) -> Result<Option<Self>, SecretsError> {
        let path = dir.join(SECRETS_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| SecretsError::Invalid {
                    path,
                    message: e.to_string(),
                }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SecretsError::Io { path, source }),
        }
    }

    /// Reads `<dir>/secrets.toml`, creating the folder and the file if needed.
    pub fn load_or_create(dir: &Path) -> Result<Self, SecretsError> {
        if let Some(existing) = Self::load(dir)? {
            return Ok(existing);
        }
        private_dir(dir).map_err(|source| SecretsError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let secrets = Self::generate();
        let path = dir.join(SECRETS_FILE);
        let text = toml::to_string(&secrets).map_err(|e| SecretsError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&path).map_err(|source| SecretsError::Io {
            path: path.clone(),
            source,
        })?;
        file.write_all(text.as_bytes())
            .map_err(|source| SecretsError::Io {
                path: path.clone(),
                source,
            })?;
        file.sync_all()
            .map_err(|source| SecretsError::Io { path, source })?;
        Ok(secrets)
    }
}

/// Creates `dir` (and missing parents) readable by its owner only: it holds history and
/// secrets. An existing folder keeps its mode.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = GeneratedSecrets::load_or_create(dir.path()).expect("create");
        let second = GeneratedSecrets::load_or_create(dir.path()).expect("load");
        assert_eq!(first, second);
        assert_eq!(first.api_key.len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(SECRETS_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
