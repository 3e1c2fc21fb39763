//! TLS for the PostgreSQL outbox connection, with libpq's `sslmode` meanings, so a
//! `DATABASE_URL` copied from a managed database's console works as it does with `psql`:
//!
//! - `disable`: plain TCP;
//! - `prefer` (the default): TLS when the server offers it, plain otherwise; the certificate
//!   is not checked (libpq does not either);
//! - `require`: TLS or no connection; the certificate is not checked (as libpq without a
//!   root certificate);
//! - `verify-ca`: TLS, the certificate must chain to `sslrootcert` (a PEM file) or, without
//!   it, to the operating system's roots;
//! - `verify-full`: as `verify-ca`, and the certificate must name the host connected to.
//!
//! `tokio-postgres` parses only `disable`, `prefer` and `require`, and no `sslrootcert`:
//! [`split_url`] takes the verifying modes and `sslrootcert` out of the URL (both the
//! `postgres://…?sslmode=…` and the `key=value` forms) before it is parsed, and
//! [`connector`] builds the rustls configuration they ask for.
//!
//! May touch: the `sslrootcert` file it is given.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Whether and how the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// `disable`, `prefer`, `require`: encryption without a certificate check.
    Nothing,
    /// `verify-ca`: the chain, not the name.
    Chain,
    /// `verify-full`: the chain and the host name.
    Full,
}

/// The URL for `tokio-postgres` and what it cannot express.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// The URL with `verify-ca`/`verify-full` turned into `require` and `sslrootcert` removed.
    pub url: String,
    pub verify: Verify,
    pub root_cert: Option<PathBuf>,
}

/// Takes `sslmode=verify-*` and `sslrootcert` out of `url` (URL or `key=value` form).
pub fn split_url(url: &str) -> Result<Split, String> {
    let mut verify = Verify::Nothing;
    let mut root_cert = None;
    let mut take = |key: &str, value: &str| -> Result<Option<String>, String> {
        match (key, value) {
            ("sslmode", "verify-ca") => {
                verify = Verify::Chain;
                Ok(Some("sslmode=require".into()))
            }
            ("sslmode", "verify-full") => {
                verify = Verify::Full;
                Ok(Some("sslmode=require".into()))
            }
            ("sslrootcert", path) if !path.is_empty() => {
                root_cert = Some(PathBuf::from(path));
                Ok(None)
            }
            ("sslrootcert", _) => Err("sslrootcert is empty".into()),
            _ => Ok(Some(format!("{key}={value}"))),
        }
    };
    let rewritten = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    let decoded = percent_decode(value)?;
                    match take(key, &decoded)? {
                        // Untouched pairs keep their original (encoded) text.
                        Some(_) if key != "sslmode" => kept.push(pair.to_owned()),
                        Some(text) => kept.push(text),
                        None => {}
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            match word.split_once('=') {
                Some((key @ ("sslmode" | "sslrootcert"), value)) => {
                    if value.starts_with('\'') {
                        return Err(format!("{key}: quoted values are not supported"));
                    }
                    if let Some(text) = take(key, value)? {
                        kept.push(text);
                    }
                }
                _ => kept.push(word.to_owned()),
            }
        }
        kept.join(" ")
    };
    if root_cert.is_some() && verify == Verify::Nothing {
        return Err(
            "sslrootcert is set: use sslmode=verify-ca or verify-full to check against it".into(),
        );
    }
    Ok(Split {
        url: rewritten,
        verify,
        root_cert,
    })
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = text
                    .get(index + 1..index + 3)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in {text:?}"))?;
                out.push(hex);
                index += 3;
            }
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// The connector for `split`'s verification.
pub fn connector(split: &Split) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match split.verify {
        Verify::Nothing => Arc::new(Relaxed {
            chain: None,
            provider: provider.clone(),
        }),
        Verify::Chain | Verify::Full => {
            let roots = Arc::new(roots(split.root_cert.as_ref())?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
            if split.verify == Verify::Full {
                webpki
            } else {
                Arc::new(Relaxed {
                    chain: Some(webpki),
                    provider: provider.clone(),
                })
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `sslrootcert`'s certificates, or the operating system's roots.
fn roots(file: Option<&PathBuf>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match file {
        Some(path) => {
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            for certificate in certificates {
                let certificate =
                    certificate.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                store
                    .add(certificate)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    if store.is_empty() {
        return Err("no root certificates to verify the server with".into());
    }
    Ok(store)
}

/// The checks below `verify-full`: no certificate check at all (`prefer`, `require`: libpq's
/// meaning), or the chain without the name (`verify-ca`). The handshake's signature is checked
/// in both, so the session is encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct Relaxed {
    /// `verify-ca`'s chain check; `None`: no certificate check.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_modes_and_the_root_certificate_are_taken_out_of_a_url() {
        let split =
            split_url("postgres://app@db:5432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x%20y")
                .expect("parses");
        assert_eq!(
            split.url,
            "postgres://app@db:5432/app?sslmode=require&application_name=x%20y"
        );
        assert_eq!(split.verify, Verify::Full);
        assert_eq!(split.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let split = split_url("host=db sslmode=verify-ca dbname=app").expect("parses");
        assert_eq!(split.url, "host=db sslmode=require dbname=app");
        assert_eq!(split.verify, Verify::Chain);
        assert_eq!(split.root_cert, None);
    }

    #[test]
    fn other_modes_pass_through_unchanged() {
        for url in [
            "postgres://app@db/app",
            "postgres://app@db/app?sslmode=require",
            "host=db sslmode=disable",
        ] {
            let split = split_url(url).expect("parses");
            assert_eq!(split.url, url);
            assert_eq!(split.verify, Verify::Nothing);
        }
    }

    #[test]
    fn a_root_certificate_without_a_verifying_mode_is_refused() {
        let error = split_url("postgres://db/app?sslmode=require&sslrootcert=/ca.pem")
            .expect_err("refused");
        assert!(error.contains("verify-ca or verify-full"), "{error}");
        assert!(split_url("postgres://db/app?sslrootcert=%zz&sslmode=verify-ca").is_err());
    }
}
