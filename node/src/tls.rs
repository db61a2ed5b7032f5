//! The cluster's keys: a CA, the certificate the nodes show clients, and the
//! secret that signs session tokens.
//!
//! `fishchat-node init --dir DIR` creates them once for a cluster (scripts do
//! it before the first start); every node of the cluster reads the same files:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the cluster CA's certificate: what clients trust |
//! | `ca.key` | the CA's private key (only needed to issue more certificates) |
//! | `node.pem`, `node.key` | the nodes' certificate (names `fishchat`, `localhost`, 127.0.0.1, ::1) and key |
//! | `token.key` | 32 random bytes, hex: the HMAC key of session tokens |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The server name every node certificate carries, whatever address a client
/// dialled; clients verify it.
pub const SERVER_NAME: &str = "fishchat";
/// The ALPN protocol of the client protocol, version 1.
pub const ALPN: &[u8] = b"fishchat/1";

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const NODE_CERT: &str = "node.pem";
const NODE_KEY: &str = "node.key";
const TOKEN_KEY: &str = "token.key";

/// Creates the cluster's keys in `dir` unless they exist. Returns false when
/// they existed already (nothing is overwritten).
pub fn init(dir: &Path) -> anyhow::Result<bool> {
    let files = [CA_CERT, CA_KEY, NODE_CERT, NODE_KEY, TOKEN_KEY];
    let present: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| dir.join(f).exists())
        .collect();
    if present.len() == files.len() {
        return Ok(false);
    }
    if !present.is_empty() {
        bail!(
            "{} holds some of the cluster's keys ({}) but not all; remove them or restore the rest",
            dir.display(),
            present.join(", ")
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "FishChat cluster CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut node_params = CertificateParams::new(vec![SERVER_NAME.into(), "localhost".into()])?;
    node_params
        .distinguished_name
        .push(DnType::CommonName, "FishChat node");
    for ip in ["127.0.0.1", "::1"] {
        node_params
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse()?));
    }
    let node_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let node_cert = node_params.signed_by(&node_key, &issuer)?;

    let secret_hex = random_hex(32)?;

    write_public(&dir.join(CA_CERT), &ca_cert.pem())?;
    write_private(&dir.join(CA_KEY), &ca_key_pem)?;
    write_public(&dir.join(NODE_CERT), &node_cert.pem())?;
    write_private(&dir.join(NODE_KEY), &node_key.serialize_pem())?;
    write_private(&dir.join(TOKEN_KEY), &format!("{secret_hex}\n"))?;
    Ok(true)
}

/// What a node loads from the key directory.
pub struct ClusterKeys {
    /// The QUIC server configuration (TLS 1.3, ALPN `fishchat/1`).
    pub server_crypto: Arc<rustls::ServerConfig>,
    /// The HMAC key of session tokens.
    pub token_secret: Vec<u8>,
}

/// Loads the keys `init` made in `dir`.
pub fn load(dir: &Path) -> anyhow::Result<ClusterKeys> {
    let missing: Vec<PathBuf> = [NODE_CERT, NODE_KEY, TOKEN_KEY]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| !p.exists())
        .collect();
    if !missing.is_empty() {
        bail!(
            "the cluster's keys are missing ({}); create them once for the cluster with `fishchat-node init --dir {}` (scripts/cluster.sh start does)",
            missing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        );
    }
    let cert_path = dir.join(NODE_CERT);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate", cert_path.display()))?;
    let key_path = dir.join(NODE_KEY);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the node certificate does not match its key")?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data could be replayed; the protocol does not accept it.
    server.max_early_data_size = 0;

    let token_path = dir.join(TOKEN_KEY);
    let text = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading {}", token_path.display()))?;
    let token_secret = parse_hex(text.trim())
        .filter(|s| s.len() >= 16)
        .with_context(|| {
            format!(
                "{} must hold at least 16 bytes as hex",
                token_path.display()
            )
        })?;
    Ok(ClusterKeys {
        server_crypto: Arc::new(server),
        token_secret,
    })
}

/// `bytes` bytes from the system random source, as hex.
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buffer = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buffer)
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_loadable_keys_once_and_refuses_a_partial_set() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(init(dir.path()).expect("first init"));
        let ca = std::fs::read(dir.path().join(CA_CERT)).expect("ca");
        assert!(!init(dir.path()).expect("second init"), "nothing redone");
        assert_eq!(
            std::fs::read(dir.path().join(CA_CERT)).expect("ca"),
            ca,
            "nothing overwritten"
        );
        let keys = load(dir.path()).expect("loads");
        assert_eq!(keys.token_secret.len(), 32);
        assert_eq!(keys.server_crypto.alpn_protocols, vec![ALPN.to_vec()]);

        std::fs::remove_file(dir.path().join(NODE_KEY)).expect("remove");
        assert!(init(dir.path()).is_err(), "a partial set is not completed");
        assert!(load(dir.path()).is_err(), "nor loaded");
    }

    #[test]
    fn hex_parsing_refuses_odd_or_foreign_text() {
        assert_eq!(parse_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(parse_hex("0"), None);
        assert_eq!(parse_hex("zz"), None);
    }
}
