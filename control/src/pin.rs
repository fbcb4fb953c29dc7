//! Certificate pinning: the node accepts the coordinator by the SHA-256 of
//! its certificate, as the join token states it. No CA, no name check.

use std::sync::Arc;

use meshd_proto::token::{cert_pin, Hex};
use meshd_proto::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The node's TLS configuration: TLS 1.3, ALPN `meshd/1`, and exactly the
/// certificate whose SHA-256 is `pin`.
pub fn client_config(pin: [u8; 32]) -> Result<rustls::ClientConfig, rustls::Error> {
    pinned_client_config(
        pin,
        ALPN,
        "coordinator certificate does not match the join token's pin",
        "a different coordinator, or a token for another mesh",
    )
}

/// A TLS 1.3 client configuration that offers `alpn` and accepts exactly the
/// certificate whose SHA-256 is `pin` (the relay client uses it too). A
/// mismatch fails the handshake with `"{mismatch} {pin} ({hint})"`.
pub fn pinned_client_config(
    pin: [u8; 32],
    alpn: &[u8],
    mismatch: &'static str,
    hint: &'static str,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(ring::default_provider());
    let verifier = PinVerifier {
        pin,
        provider: provider.clone(),
        mismatch,
        hint,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Accepts the server certificate by its hash alone. The handshake signature
/// is still verified with the certificate's key, so only the holder of the
/// pinned certificate's private key can complete the handshake.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    mismatch: &'static str,
    hint: &'static str,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if cert_pin(end_entity.as_ref()) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "{} {} ({})",
                self.mismatch,
                Hex(&self.pin),
                self.hint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so this is never reached by a valid handshake.
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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
