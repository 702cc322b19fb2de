//! TLS the libpq way against a server that accepts only `hostssl` connections, with a CA and a
//! server certificate made here (for `localhost` only): `run`, `plan` and `status` work with
//! `sslmode=verify-full sslrootcert=<ca>`; `require` encrypts without a root certificate; a
//! certificate from another CA, or a host name the certificate does not list, is refused with a
//! message naming the server, the mode and what did not verify, before anything is created.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use support::process::output;

struct TlsServer {
    port: u16,
    /// Unix-socket directory, for the test's own setup (no TLS there).
    socket_dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    /// A client certificate for role `certuser`, signed by `ca`, and its key.
    client_cert: PathBuf,
    client_key: PathBuf,
    major: u32,
}

/// A CA, and (when `server` is given) a certificate for `localhost` signed by it.
fn make_ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = p.self_signed(&key).expect("self-signed CA");
    (cert, key)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Turn this binary's server into a TLS-only one: certificate files in its data directory,
/// `ssl = on`, and a pg_hba.conf with `hostssl` lines only (plus the local socket for setup).
fn tls_server() -> &'static TlsServer {
    static TLS: OnceLock<TlsServer> = OnceLock::new();
    TLS.get_or_init(|| {
        let s = support::server();
        let dir = &s.data_dir;
        let (ca, ca_key) = make_ca("shadow-alter test CA");
        let (other, _) = make_ca("another CA");
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        p.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().expect("server key");
        let cert = p.signed_by(&key, &ca, &ca_key).expect("server certificate");
        write(&dir.join("server.crt"), &cert.pem());
        write(&dir.join("server.key"), &key.serialize_pem());
        let pki = std::env::temp_dir().join(format!("shadow-alter-tls-{}", std::process::id()));
        std::fs::create_dir_all(&pki).expect("pki dir");
        write(&pki.join("ca.crt"), &ca.pem());
        write(&pki.join("other-ca.crt"), &other.pem());
        write(&dir.join("root.crt"), &ca.pem());
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, "certuser");
        let client_key = KeyPair::generate().expect("client key");
        let client = p.signed_by(&client_key, &ca, &ca_key).expect("client certificate");
        write(&pki.join("client.crt"), &client.pem());
        write(&pki.join("client.key"), &client_key.serialize_pem());
        {
            use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
            let owner = std::fs::metadata(dir).expect("data dir").uid();
            for f in ["server.crt", "server.key", "root.crt"] {
                let _ = chown(dir.join(f), Some(owner), None);
            }
            std::fs::set_permissions(dir.join("server.key"), PermissionsExt::from_mode(0o600))
                .expect("key permissions");
        }
        write(
            &dir.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl all certuser ::1/128 cert\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl all all ::1/128 trust\n",
        );
        let conf = std::fs::read_to_string(dir.join("postgresql.auto.conf")).expect("conf");
        write(
            &dir.join("postgresql.auto.conf"),
            &format!("{conf}ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n"),
        );
        s.restart();
        TlsServer {
            port: s.port,
            socket_dir: dir.clone(),
            ca: pki.join("ca.crt"),
            other_ca: pki.join("other-ca.crt"),
            client_cert: pki.join("client.crt"),
            client_key: pki.join("client.key"),
            major: s.major(),
        }
    })
}

/// A session over the Unix socket (no TLS there), for setup and checks.
async fn local(db: &str) -> tokio_postgres::Client {
    let t = tls_server();
    support::connect(&format!(
        "host={} port={} user=postgres dbname={db}",
        t.socket_dir.display(),
        t.port
    ))
    .await
}

/// A fresh database with `items(id int primary key, qty int)` and some rows.
async fn fresh(name: &str) -> tokio_postgres::Client {
    local("postgres")
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let c = local(name).await;
    c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, qty int);
         INSERT INTO items SELECT g, g FROM generate_series(1, 2000) g",
    )
    .await
    .expect("setup");
    c
}

fn url(host: &str, db: &str, params: &str) -> String {
    format!(
        "postgres://postgres@{host}:{}/{db}?{params}",
        tls_server().port
    )
}

const ALTER: &str = "ALTER COLUMN qty TYPE bigint";

fn run_args(table: &str) -> Vec<&str> {
    vec![
        "run",
        "--table",
        table,
        "--alter",
        ALTER,
        "--strategy",
        "shadow-copy",
        "--progress",
        "none",
    ]
}

async fn qty_type(c: &tokio_postgres::Client) -> Option<String> {
    support::column_type(c, "items", "qty").await
}

/// What a refused connection must have left: nothing.
async fn assert_nothing_created(c: &tokio_postgres::Client) {
    let leftovers = support::count(
        c,
        "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'shadow_alter%')
              + (SELECT count(*) FROM pg_replication_slots WHERE database = current_database())
              + (SELECT count(*) FROM pg_publication)",
    )
    .await;
    assert_eq!(leftovers, 0, "a refused connection created something");
    assert_eq!(qty_type(c).await.as_deref(), Some("integer"));
}

#[tokio::test]
async fn verify_full_runs_plans_and_reports_over_tls_only() {
    let t = tls_server();
    let c = fresh("tls_full").await;
    let u = url(
        "localhost",
        "tls_full",
        &format!("sslmode=verify-full&sslrootcert={}", t.ca.display()),
    );
    let (code, out) = output(&u, &["plan", "--table", "items", "--alter", ALTER], &[]).await;
    assert_eq!(code, 0, "plan over verify-full: {out}");
    let (code, out) = output(&u, &run_args("items"), &[]).await;
    assert_eq!(code, 0, "run over verify-full: {out}");
    assert_eq!(qty_type(&c).await.as_deref(), Some("bigint"));
    let (code, out) = output(&u, &["status"], &[]).await;
    assert_eq!(code, 0, "status over verify-full: {out}");
    assert!(out.contains("items"), "status lists the run: {out}");
}

#[tokio::test]
async fn a_certificate_that_does_not_verify_is_refused_and_nothing_is_created() {
    let t = tls_server();
    let c = fresh("tls_bad").await;
    let port = t.port;
    // signed by a CA we were not told to trust
    let wrong_ca = url(
        "localhost",
        "tls_bad",
        &format!("sslmode=verify-full&sslrootcert={}", t.other_ca.display()),
    );
    // the right CA, but the certificate names localhost, not 127.0.0.1
    let wrong_name = url(
        "127.0.0.1",
        "tls_bad",
        &format!("sslmode=verify-full&sslrootcert={}", t.ca.display()),
    );
    for (u, host, what) in [
        (&wrong_ca, "localhost", "not signed by a CA"),
        (&wrong_name, "127.0.0.1", "not valid for the host name"),
    ] {
        for args in [
            run_args("items"),
            vec!["plan", "--table", "items", "--alter", ALTER],
            vec!["status"],
        ] {
            let (code, out) = output(u, &args, &[]).await;
            assert_eq!(code, 3, "{args:?} must be refused: {out}");
            for part in [&format!("{host}:{port}"), "sslmode=verify-full", what] {
                assert!(out.contains(part), "{args:?}: {part:?} not in: {out}");
            }
        }
    }
    assert_nothing_created(&c).await;
    // verify-ca checks the CA only: the same address is accepted
    let verify_ca = url(
        "127.0.0.1",
        "tls_bad",
        &format!("sslmode=verify-ca&sslrootcert={}", t.ca.display()),
    );
    let (code, out) = output(&verify_ca, &["status"], &[]).await;
    assert_eq!(code, 0, "verify-ca by address: {out}");
}

#[tokio::test]
async fn require_encrypts_without_a_root_certificate_and_pgssl_variables_work() {
    let t = tls_server();
    let c = fresh("tls_req").await;
    let (code, out) = output(
        &url("127.0.0.1", "tls_req", "sslmode=require"),
        &run_args("items"),
        &[],
    )
    .await;
    assert_eq!(code, 0, "run over require: {out}");
    assert_eq!(qty_type(&c).await.as_deref(), Some("bigint"));
    // the PGSSL* variables, with a URL that says nothing about TLS
    let plain = format!("postgres://postgres@localhost:{}/tls_req", t.port);
    let ca = t.ca.display().to_string();
    let env = [("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca.as_str())];
    let (code, out) = output(&plain, &["status"], &env).await;
    assert_eq!(code, 0, "PGSSLMODE=verify-full: {out}");
    let wrong = t.other_ca.display().to_string();
    let env = [
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", wrong.as_str()),
    ];
    let (code, out) = output(&plain, &["status"], &env).await;
    assert_eq!(code, 3, "PGSSLROOTCERT of another CA: {out}");
    // the server takes no plaintext: disable is refused by pg_hba.conf, allow retries with TLS
    let (code, out) = output(&plain, &["status"], &[("PGSSLMODE", "disable")]).await;
    assert_ne!(code, 0, "plaintext must be refused: {out}");
    assert!(out.contains("no encryption"), "the server's reason: {out}");
    let (code, out) = output(&plain, &["status"], &[("PGSSLMODE", "allow")]).await;
    assert_eq!(code, 0, "allow falls back to TLS: {out}");
    // and so does the walsender client of a run
    let back = [
        "run",
        "--table",
        "items",
        "--alter",
        "ALTER COLUMN qty TYPE integer",
        "--strategy",
        "shadow-copy",
        "--progress",
        "none",
    ];
    let (code, out) = output(&plain, &back, &[("PGSSLMODE", "allow")]).await;
    assert_eq!(code, 0, "run with allow: {out}");
    assert_eq!(qty_type(&c).await.as_deref(), Some("integer"));
    // sslrootcert=system: the platform's roots (here SSL_CERT_FILE, which the native store
    // honours, holds our CA) and verify-full implied
    let system = format!(
        "postgres://postgres@localhost:{}/tls_req?sslrootcert=system",
        t.port
    );
    let (code, out) = output(&system, &["status"], &[("SSL_CERT_FILE", ca.as_str())]).await;
    assert_eq!(code, 0, "sslrootcert=system: {out}");
    let (code, out) = output(&system, &["status"], &[("SSL_CERT_FILE", wrong.as_str())]).await;
    assert_eq!(code, 3, "sslrootcert=system without our CA: {out}");
    assert!(
        out.contains("sslmode=verify-full, sslrootcert=system"),
        "{out}"
    );
    // a root certificate file that is not there is bad input, named
    let env = [
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", "/nonexistent/ca.crt"),
    ];
    let (code, out) = output(&plain, &["status"], &env).await;
    assert_eq!(code, 2, "missing root certificate: {out}");
    assert!(out.contains("/nonexistent/ca.crt"), "{out}");
}

#[tokio::test]
async fn direct_tls_negotiation_where_the_server_supports_it() {
    let t = tls_server();
    if t.major < 17 {
        eprintln!(
            "PostgreSQL {} has no direct TLS negotiation; skipped",
            t.major
        );
        return;
    }
    let c = fresh("tls_direct").await;
    let u = url(
        "localhost",
        "tls_direct",
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslnegotiation=direct",
            t.ca.display()
        ),
    );
    let (code, out) = output(&u, &run_args("items"), &[]).await;
    assert_eq!(code, 0, "run with sslnegotiation=direct: {out}");
    assert_eq!(qty_type(&c).await.as_deref(), Some("bigint"));
}

#[tokio::test]
async fn a_client_certificate_authenticates_the_role() {
    let t = tls_server();
    let c = local("postgres").await;
    for sql in [
        "CREATE ROLE certuser LOGIN",
        "CREATE DATABASE tls_cert OWNER certuser",
    ] {
        c.batch_execute(sql).await.expect(sql);
    }
    let base = format!(
        "postgres://certuser@localhost:{}/tls_cert?sslmode=verify-full&sslrootcert={}",
        t.port,
        t.ca.display()
    );
    let with_cert = format!(
        "{base}&sslcert={}&sslkey={}",
        t.client_cert.display(),
        t.client_key.display()
    );
    let (code, out) = output(&with_cert, &["status"], &[]).await;
    assert_eq!(code, 0, "status with a client certificate: {out}");
    // the same from PGSSLCERT / PGSSLKEY
    let (cert, key) = (
        t.client_cert.display().to_string(),
        t.client_key.display().to_string(),
    );
    let env = [("PGSSLCERT", cert.as_str()), ("PGSSLKEY", key.as_str())];
    let (code, out) = output(&base, &["status"], &env).await;
    assert_eq!(code, 0, "PGSSLCERT and PGSSLKEY: {out}");
    // without one, pg_hba.conf's `cert` method refuses the role
    let (code, out) = output(&base, &["status"], &[]).await;
    assert_ne!(code, 0, "no client certificate: {out}");
    assert!(out.contains("certificate"), "the reason: {out}");
}

/// The proxy's `--upstream-tls verify-full`: relays over verified TLS when the certificate is
/// signed by the given CA and names the upstream host, and turns clients away with the reason
/// when it is not (another CA; the right CA but an address the certificate does not name).
#[tokio::test]
async fn the_proxy_verifies_the_server_certificate_like_libpq() {
    use shadow_alter::proxy::ProxyConfig;
    use shadow_alter::tls::{RootCert, SslMode, TlsSettings};
    let t = tls_server();
    fresh("tls_proxy").await;
    let proxy = |mode: SslMode, ca: &Path, host: &str| {
        let config = ProxyConfig {
            upstream_tls: TlsSettings {
                mode,
                root: Some(RootCert::File(ca.to_path_buf())),
                ..TlsSettings::default()
            },
            ..ProxyConfig::new("127.0.0.1:0", format!("{host}:{}", t.port))
        };
        support::proxy::start_with(config)
    };
    let through = |p: &support::proxy::Proxy| {
        format!(
            "postgres://postgres@127.0.0.1:{}/tls_proxy?sslmode=disable",
            p.addr.port()
        )
    };
    let good = proxy(SslMode::VerifyFull, &t.ca, "localhost").await;
    let c = support::connect(&through(&good)).await;
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the proxy's session to the server is not encrypted");
    for (ca, host, what) in [
        (&t.other_ca, "localhost", "not signed by a CA"),
        (&t.ca, "127.0.0.1", "not valid for the host name"),
    ] {
        let bad = proxy(SslMode::VerifyFull, ca, host).await;
        let err = match tokio_postgres::connect(&through(&bad), tokio_postgres::NoTls).await {
            Ok(_) => panic!(
                "the proxy relayed to a server whose certificate does not verify ({host}, {})",
                ca.display()
            ),
            Err(e) => e,
        };
        let text = err
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| err.to_string());
        for part in ["sslmode=verify-full", what] {
            assert!(text.contains(part), "{part:?} not in: {text}");
        }
    }
    // verify-ca checks the chain only: by address is accepted
    let by_address = proxy(SslMode::VerifyCa, &t.ca, "127.0.0.1").await;
    support::connect(&through(&by_address)).await;
}
