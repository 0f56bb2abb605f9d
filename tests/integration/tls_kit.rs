//! A private PKI as production has one: a root CA, an intermediate that signs the receiver's
//! certificate (served with its chain), and a client certificate for mutual TLS. Generated
//! fresh per test with rcgen; nothing is checked in. And the TLS glue of the testkit's
//! receiver (the library has no TLS server of its own). The delivery bench includes this file
//! too, so it imports nothing of the test harness.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chainwatch::testkit::{Receiver, ReceiverBuilder};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestPki {
    /// The root, as an operator would put it in `ca_file`.
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    root_der: CertificateDer<'static>,
    /// Leaf then intermediate, as a server presents them.
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn leaf_params(names: &[&str], purpose: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![purpose];
    p
}

impl TestPki {
    /// Root → intermediate → `localhost`/127.0.0.1 server certificate, and a client certificate
    /// from the same intermediate; PEM files written under `dir` (the client key 0600).
    pub fn new(dir: &Path) -> TestPki {
        chainwatch::net::install_crypto_provider();
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("chainwatch test root CA");
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);

        let mid_key = KeyPair::generate().unwrap();
        let mid_params = ca_params("chainwatch test intermediate CA");
        let mid = mid_params.signed_by(&mid_key, &root_issuer).unwrap();
        let mid_issuer = Issuer::new(mid_params, mid_key);

        let server_key = KeyPair::generate().unwrap();
        let server = leaf_params(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
        .signed_by(&server_key, &mid_issuer)
        .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let client = leaf_params(&["chainwatch-client"], ExtendedKeyUsagePurpose::ClientAuth)
            .signed_by(&client_key, &mid_issuer)
            .unwrap();

        std::fs::create_dir_all(dir).unwrap();
        let ca_file = dir.join("receiver-ca.pem");
        std::fs::write(&ca_file, root.pem()).unwrap();
        let client_cert = dir.join("client.pem");
        std::fs::write(&client_cert, format!("{}{}", client.pem(), mid.pem())).unwrap();
        let client_key_path = dir.join("client.key");
        std::fs::write(&client_key_path, client_key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&client_key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        TestPki {
            ca_file,
            client_cert,
            client_key: client_key_path,
            root_der: root.der().clone(),
            server_chain: vec![server.der().clone(), mid.der().clone()],
            server_key: server_key.serialize_der(),
        }
    }

    /// The receiver's TLS config; with `require_client_cert`, only clients holding a
    /// certificate from this PKI get through the handshake.
    pub fn server_config(&self, require_client_cert: bool) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let builder = rustls::ServerConfig::builder();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.root_der.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(
            builder
                .with_single_cert(self.server_chain.clone(), key)
                .unwrap(),
        )
    }
}

/// A receiver behind TLS, counting handshakes.
pub struct TlsReceiver {
    pub receiver: Receiver,
    /// TLS handshakes completed and failed.
    pub handshakes: Arc<AtomicU64>,
    pub failed_handshakes: Arc<AtomicU64>,
}

impl std::ops::Deref for TlsReceiver {
    type Target = Receiver;
    fn deref(&self) -> &Receiver {
        &self.receiver
    }
}

impl TlsReceiver {
    /// `receiver` as an https receiver at `https://localhost:PORT/hooks` serving `tls`.
    pub async fn start(receiver: ReceiverBuilder, tls: Arc<rustls::ServerConfig>) -> TlsReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (handshakes, failed_handshakes) =
            (Arc::<AtomicU64>::default(), Arc::<AtomicU64>::default());
        let (ok, failed) = (handshakes.clone(), failed_handshakes.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let receiver = receiver.serve_with(
            listener,
            format!("https://localhost:{port}/hooks"),
            move |tcp| {
                let (acceptor, ok, failed) = (acceptor.clone(), ok.clone(), failed.clone());
                async move {
                    match acceptor.accept(tcp).await {
                        Ok(stream) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            Some(stream)
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            None
                        }
                    }
                }
            },
        );
        TlsReceiver {
            receiver,
            handshakes,
            failed_handshakes,
        }
    }
}
