//! HTTPS and WSS: the certificate and key files from `[server] tls_cert_file` /
//! `tls_key_file`, loaded into a rustls acceptor (ring provider, TLS 1.2 and 1.3, ALPN `h2`
//! and `http/1.1`) and swapped whole on reload (SIGHUP), so a renewed certificate is used by
//! new connections without a restart. Connections already open keep theirs.
//!
//! May touch: the two files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate chain {path}: {detail}")]
    Certificate { path: String, detail: String },
    #[error("cannot read the TLS private key {path}: {detail}")]
    Key { path: String, detail: String },
    #[error("the TLS certificate and key do not fit together: {0}")]
    Config(String),
}

/// The files and the acceptor built from them.
pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// The ALPN protocols offered (HTTP's, or MQTT's).
    alpn: Vec<Vec<u8>>,
    acceptor: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// The process-wide crypto provider: ring. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn build(cert_file: &Path, key_file: &Path, alpn: &[Vec<u8>]) -> Result<TlsAcceptor, TlsError> {
    let shown = |p: &Path| p.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| TlsError::Certificate {
            path: shown(cert_file),
            detail: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certificate {
            path: shown(cert_file),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: shown(cert_file),
            detail: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Key {
        path: shown(key_file),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Tls {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Self>, TlsError> {
        Self::load_with_alpn(
            cert_file,
            key_file,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )
    }

    /// [`Self::load`] offering `alpn` (MQTT offers `mqtt`; a client that asks for no
    /// protocol is served too).
    pub fn load_with_alpn(
        cert_file: &Path,
        key_file: &Path,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<Self>, TlsError> {
        let acceptor = build(cert_file, key_file, &alpn)?;
        Ok(Arc::new(Self {
            alpn,
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            acceptor: RwLock::new(acceptor),
        }))
    }

    /// Reads the files again; on error the acceptor in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = build(&self.cert_file, &self.key_file, &self.alpn)?;
        *self.acceptor.write() = acceptor;
        Ok(())
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().clone()
    }
}
