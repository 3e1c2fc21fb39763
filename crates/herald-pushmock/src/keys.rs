//! Test credentials, generated at run time so no secret is ever committed: an APNs signing
//! key (P-256, PKCS#8 PEM like the `.p8` file Apple hands out) and a Google service account
//! (RSA 2048, the JSON file the Firebase console hands out, pointed at the emulator's token
//! endpoint). Also turns private keys into the public keys the emulators verify with.
//!
//! Owns: key generation and PEM conversions. May touch: the files it is asked to write.

use std::path::{Path, PathBuf};

// p256 and rsa share one `pkcs8` crate, so these traits serve both.
use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};

/// Why a key could not be made, read or converted.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid key: {0}")]
    Invalid(String),
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An APNs token-auth key: what the Apple developer account shows (key id, team id) and
/// the `.p8` contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApnsKey {
    pub key_id: String,
    pub team_id: String,
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as in Apple's `.p8` file.
    pub private_key_pem: String,
    /// SPKI PEM (`-----BEGIN PUBLIC KEY-----`): what the APNs emulator verifies with.
    pub public_key_pem: String,
}

impl ApnsKey {
    /// A fresh P-256 key pair.
    pub fn generate(key_id: &str, team_id: &str) -> Result<Self, KeyError> {
        let secret = p256::SecretKey::random(&mut OsRng);
        let private_key_pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Invalid(e.to_string()))?
            .to_string();
        let public_key_pem = secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        Ok(Self {
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            private_key_pem,
            public_key_pem,
        })
    }

    /// Writes the private key as `AuthKey_<key id>.p8` (Apple's file name) into `dir`.
    pub fn write_p8(&self, dir: &Path) -> Result<PathBuf, KeyError> {
        let path = dir.join(format!("AuthKey_{}.p8", self.key_id));
        write(&path, &self.private_key_pem)?;
        Ok(path)
    }
}

/// A Google service account as in its JSON key file.
#[derive(Clone, Debug)]
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    pub private_key_id: String,
    /// PKCS#8 PEM, the JSON's `private_key`.
    pub private_key_pem: String,
    /// SPKI PEM: what the token endpoint verifies assertions with.
    pub public_key_pem: String,
    pub token_uri: String,
}

impl ServiceAccount {
    /// A fresh account of `project_id` with a new RSA 2048 key, whose `token_uri` is
    /// `token_uri` (the emulator's `/token`).
    pub fn generate(project_id: &str, token_uri: &str) -> Result<Self, KeyError> {
        let key = rsa::RsaPrivateKey::new(&mut OsRng, 2048)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        let private_key_pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Invalid(e.to_string()))?
            .to_string();
        let public_key_pem = rsa::RsaPublicKey::from(&key)
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        Ok(Self {
            project_id: project_id.to_owned(),
            client_email: format!("herald-test@{project_id}.iam.gserviceaccount.com"),
            private_key_id: hex::encode(rand::random::<[u8; 20]>()),
            private_key_pem,
            public_key_pem,
            token_uri: token_uri.to_owned(),
        })
    }

    /// The key file's JSON, with the fields the Firebase console writes.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!(
                "https://www.googleapis.com/robot/v1/metadata/x509/{}",
                self.client_email
            ),
            "universe_domain": "googleapis.com",
        })
    }

    /// Reads a key file: project, e-mail, token URI and the public half of its key.
    pub fn from_json(text: &str) -> Result<Self, KeyError> {
        #[derive(Deserialize)]
        struct File {
            project_id: String,
            client_email: String,
            #[serde(default)]
            private_key_id: String,
            private_key: String,
            token_uri: String,
        }
        let file: File = serde_json::from_str(text)
            .map_err(|e| KeyError::Invalid(format!("service account JSON: {e}")))?;
        let public_key_pem = rsa_public_pem(&file.private_key)?;
        Ok(Self {
            project_id: file.project_id,
            client_email: file.client_email,
            private_key_id: file.private_key_id,
            private_key_pem: file.private_key,
            public_key_pem,
            token_uri: file.token_uri,
        })
    }

    /// Writes the key file to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), KeyError> {
        write(path, &self.to_json().to_string())
    }
}

/// The SPKI PEM of a P-256 key given as a PKCS#8 private key (a `.p8`) or already as a
/// public key.
pub fn ec_public_pem(pem: &str) -> Result<String, KeyError> {
    if pem.contains("PUBLIC KEY") {
        let key = p256::PublicKey::from_public_key_pem(pem)
            .map_err(|e| KeyError::Invalid(format!("P-256 public key: {e}")))?;
        return key
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Invalid(e.to_string()));
    }
    let secret = p256::SecretKey::from_pkcs8_pem(pem)
        .map_err(|e| KeyError::Invalid(format!("P-256 PKCS#8 private key: {e}")))?;
    secret
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Invalid(e.to_string()))
}

/// The SPKI PEM of an RSA key given as a PKCS#8 private key or already as a public key.
pub fn rsa_public_pem(pem: &str) -> Result<String, KeyError> {
    let public = if pem.contains("PUBLIC KEY") {
        rsa::RsaPublicKey::from_public_key_pem(pem)
            .map_err(|e| KeyError::Invalid(format!("RSA public key: {e}")))?
    } else {
        rsa::RsaPrivateKey::from_pkcs8_pem(pem)
            .map_err(|e| KeyError::Invalid(format!("RSA PKCS#8 private key: {e}")))?
            .to_public_key()
    };
    public
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Invalid(e.to_string()))
}

fn write(path: &Path, text: &str) -> Result<(), KeyError> {
    std::fs::write(path, text).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })
}
