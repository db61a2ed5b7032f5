//! The client's QUIC and TLS settings: TLS 1.3 on the ring provider, the
//! cluster CA as the only root, ALPN `fishchat/1`, keep-alive on.

use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::ClientConfig;
use crate::error::ClientError;

/// The ALPN name of the client protocol, version 1.
pub const ALPN: &[u8] = b"fishchat/1";

/// Builds the quinn client configuration for `config`: trusts exactly the
/// certificates in `config.ca_pem`, never the system store.
pub fn quic_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&config.ca_pem) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("the CA PEM is unreadable: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("the CA certificate is unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls(
            "the CA PEM holds no certificate".to_string(),
        ));
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // The server does not accept 0-RTT data.
    tls.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;

    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(config.keep_alive_interval));
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| ClientError::Config(format!("idle timeout: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    // The server opens one push stream per session; the client opens none.
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(4));

    let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
    quic.transport_config(Arc::new(transport));
    Ok(quic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pem_without_certificates_is_refused() {
        let config = ClientConfig::new(vec![], b"not a pem".to_vec());
        assert!(matches!(
            quic_client_config(&config),
            Err(ClientError::Tls(_))
        ));
    }

    #[test]
    fn a_garbled_certificate_is_refused() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let config = ClientConfig::new(vec![], pem.to_vec());
        assert!(matches!(
            quic_client_config(&config),
            Err(ClientError::Tls(_))
        ));
    }
}
