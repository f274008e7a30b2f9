//! TLS for the broker connection: the certificate authority that signed the broker's certificate
//! and, for brokers that ask clients to prove who they are, the station's own certificate and
//! key. Built once, when the config is checked, so that a missing or wrong file is reported then
//! and not as a failure to connect on every retry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read PEM certificates from {path}: {source}")]
    ReadCertificates { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: a certificate the TLS library refuses as an authority: {source}")]
    BadAuthority { path: PathBuf, source: rustls::Error },
    #[error("cannot read a PEM private key from {path}: {source}")]
    ReadKey { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("`cert_file` and `key_file` go together: give both for a client certificate, or neither")]
    CertificateWithoutKey,
    #[error("the client certificate and key cannot be used together: {0}")]
    ClientCertificate(rustls::Error),
    #[error("the TLS library has no protocol version in common with its crypto provider: {0}")]
    Protocol(rustls::Error),
}

/// The rustls client configuration for `tls`, with paths relative to `base_dir`.
pub fn client_config(tls: &TlsConfig, base_dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let ca_path = base_dir.join(&tls.ca_file);
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(&ca_path)? {
        roots.add(certificate).map_err(|source| TlsError::BadAuthority { path: ca_path.clone(), source })?;
    }
    // ring rather than rustls' default aws-lc: no cmake, and a fraction of the build time.
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?
        .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let certificates = read_certificates(&base_dir.join(cert))?;
            let key_path = base_dir.join(key);
            let key = PrivateKeyDer::from_pem_file(&key_path)
                .map_err(|source| TlsError::ReadKey { path: key_path, source })?;
            builder.with_client_auth_cert(certificates, key).map_err(TlsError::ClientCertificate)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsError::CertificateWithoutKey),
    };
    Ok(Arc::new(config))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |source| TlsError::ReadCertificates { path: path.to_owned(), source };
    let certificates =
        CertificateDer::pem_file_iter(path).map_err(read_error)?.collect::<Result<Vec<_>, _>>().map_err(read_error)?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certificates)
}
