//! Authentication relayed through the proxy (cleartext, MD5, SCRAM-SHA-256, wrong passwords),
//! TLS from clients to the proxy (certificate from rcgen), TLS to the upstream server, and the
//! admin console's own SCRAM check.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::Command;
use tokio::sync::OnceCell;

use crate::common::*;
use crate::support;

const PW: &str = "pa ss'word";

static ROLES: OnceCell<()> = OnceCell::const_new();

/// Roles with passwords and pg_hba lines (at the top, first match wins) that require each
/// method for that role only; everything else keeps trust.
async fn password_roles() {
    ROLES
        .get_or_init(|| async {
            let s = support::server();
            let c = support::connect(&s.url).await;
            let esc = PW.replace('\'', "''");
            c.batch_execute(&format!(
                "SET password_encryption = 'md5';
                 CREATE ROLE md5_user LOGIN PASSWORD '{esc}';
                 CREATE ROLE clear_user LOGIN PASSWORD '{esc}';
                 SET password_encryption = 'scram-sha-256';
                 CREATE ROLE scram_user LOGIN PASSWORD '{esc}';"
            ))
            .await
            .expect("create roles");
            let hba = s.data_dir.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
            let new = format!(
                "host all md5_user 127.0.0.1/32 md5\n\
                 host all clear_user 127.0.0.1/32 password\n\
                 host all scram_user 127.0.0.1/32 scram-sha-256\n{old}"
            );
            std::fs::write(&hba, new).expect("write pg_hba.conf");
            c.batch_execute("SELECT pg_reload_conf()")
                .await
                .expect("reload");
            // the reload is asynchronous: wait until the scram rule is in force
            support::wait_until(WAIT, "pg_hba.conf to be reloaded", || async {
                let url = s.url.replace("postgres@", "scram_user@");
                tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .is_err()
            })
            .await;
        })
        .await;
}

fn role_url(url: &str, user: &str, password: &str) -> String {
    let pw: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    url.replace("postgres@", &format!("{user}:{pw}@"))
}

async fn try_connect(url: &str) -> Result<i32, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c.query_one("SELECT 1", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_methods_are_relayed() {
    password_roles().await;
    let p = proxy().await;
    let url = via(&support::fresh_db("auth").await, p.addr);
    for user in ["md5_user", "clear_user", "scram_user"] {
        assert_eq!(
            try_connect(&role_url(&url, user, PW))
                .await
                .unwrap_or_else(|e| panic!("{user}: {e}")),
            1
        );
        let err = try_connect(&role_url(&url, user, "wrong"))
            .await
            .expect_err("wrong password accepted");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{user}: {err}"
        );
    }
    // libpq (psql) with SCRAM through the proxy
    let out = Command::new(support::client_tool("psql"))
        .args([
            "-X",
            "-At",
            "-d",
            &role_url(&url, "scram_user", PW),
            "-c",
            "SELECT current_user",
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "scram_user",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed certificate for `localhost` in PEM files; returns (cert, key) paths.
fn certificate(dir_name: &str, owner_postgres: Option<&std::path::Path>) -> (PathBuf, PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("rcgen");
    let dir = match owner_postgres {
        Some(d) => d.to_path_buf(),
        None => {
            let d = std::env::temp_dir().join(format!("{dir_name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).expect("cert dir");
            d
        }
    };
    let cert = dir.join(format!("{dir_name}.crt"));
    let key = dir.join(format!("{dir_name}.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_to_proxy_with_plain_upstream() {
    password_roles().await;
    let (cert, key) = certificate("proxy-tls", None);
    let p = proxy_with(Opts {
        tls: Some((cert, key)),
        ..Opts::default()
    })
    .await;
    let url = via(&support::fresh_db("tls").await, p.addr);
    let psql = support::client_tool("psql");
    let admin_conn = admin(p.addr).await;
    // SCRAM over TLS: libpq sends the gs2 flag 'y' (it could bind, the server offered no PLUS)
    let scram = format!("{}?sslmode=require", role_url(&url, "scram_user", PW));
    let conn = Command::new(&psql)
        .args([
            "-X",
            "-At",
            "-d",
            &scram,
            "-c",
            "SELECT current_user",
            "-c",
            "SELECT pg_sleep(0)",
            "-c",
            "\\conninfo",
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("psql");
    let out = String::from_utf8_lossy(&conn.stdout);
    assert!(
        conn.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&conn.stderr)
    );
    assert!(
        out.contains("scram_user") && out.contains("SSL connection"),
        "{out}"
    );
    // the proxy saw a TLS client
    let plain = support::connect(&url).await;
    plain
        .batch_execute("SELECT 1")
        .await
        .expect("plain clients still work");
    let rows = console(&admin_conn, "SHOW CLIENTS")
        .await
        .expect("show clients");
    assert!(
        rows.iter().all(|r| r[4].as_deref() == Some("off")),
        "only the plain client is still connected: {rows:?}"
    );
    // channel binding cannot work through a TLS-terminating proxy, and is refused cleanly
    let bound = format!("{scram}&channel_binding=require");
    let out = Command::new(&psql)
        .args(["-X", "-At", "-d", &bound, "-c", "SELECT 1"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("psql");
    assert!(!out.status.success());
    // sslmode=disable keeps working on the same port
    let out = Command::new(&psql)
        .args([
            "-X",
            "-At",
            "-d",
            &format!("{url}?sslmode=disable"),
            "-c",
            "SELECT 5",
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("psql");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_upstream() {
    password_roles().await;
    let s = support::server();
    let (cert, key) = certificate("server", Some(&s.data_dir));
    // the server runs as the data directory's owner; give it its key
    let meta = std::fs::metadata(&s.data_dir).expect("data dir");
    use std::os::unix::fs::MetadataExt;
    for f in [&cert, &key] {
        std::os::unix::fs::chown(f, Some(meta.uid()), Some(meta.gid())).expect("chown");
    }
    let c = support::connect(&s.url).await;
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        "ALTER SYSTEM SET ssl = on".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        c.batch_execute(&sql).await.expect("enable ssl");
    }
    let p = proxy_with(Opts {
        upstream_tls: Some(shadow_alter::tls::SslMode::Require),
        ..Opts::default()
    })
    .await;
    let url = via(&support::fresh_db("uptls").await, p.addr);
    support::wait_until(WAIT, "the server to accept TLS", || {
        let url = url.clone();
        async move {
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
        }
    })
    .await;
    let client = support::connect(&url).await;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the upstream connection is not encrypted");
    // SCRAM through a TLS upstream: the proxy hides SCRAM-SHA-256-PLUS from the plain client
    assert_eq!(
        try_connect(&role_url(&url, "scram_user", PW))
            .await
            .expect("scram over TLS upstream"),
        1
    );
    // cancel goes through TLS upstream as well
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(60)").await });
    let observer = support::connect(&s.url).await;
    support::wait_until(WAIT, "the sleep to start", || {
        let observer = &observer;
        async move {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) >= 1)
                .unwrap_or(false)
        }
    })
    .await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let err = tokio::time::timeout(WAIT, sleeper)
        .await
        .expect("cancelled")
        .expect("join")
        .expect_err("cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_needs_its_own_credentials() {
    let p = proxy().await;
    let url = admin_url(p.addr);
    let c = support::connect(&url).await;
    assert_eq!(status(&c).await["paused"], "off");
    let wrong = url.replace(ADMIN_PASSWORD, "nope");
    let err = tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
        .await
        .err()
        .expect("wrong password refused");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );
    let other_user = url.replace(&format!("{ADMIN_USER}:"), "postgres:");
    assert!(
        tokio_postgres::connect(&other_user, tokio_postgres::NoTls)
            .await
            .is_err(),
        "another user got in"
    );
    // the extended protocol is refused but the session survives
    let e = c
        .query("SELECT 1", &[])
        .await
        .expect_err("extended protocol");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED)
    );
    assert_eq!(status(&c).await["clients"], "0");

    // without credentials the console is off, with a clear error
    let off = proxy_with(Opts {
        no_admin: true,
        ..Opts::default()
    })
    .await;
    let err = tokio_postgres::connect(&admin_url(off.addr), tokio_postgres::NoTls)
        .await
        .err()
        .expect("console off");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME),
        "{err}"
    );
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("admin console"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_negotiation() {
    // PostgreSQL 17 clients with sslnegotiation=direct start TLS at once (ALPN "postgresql").
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cert, key) = certificate("direct-tls", None);
    let p = proxy_with(Opts {
        tls: Some((cert.clone(), key)),
        ..Opts::default()
    })
    .await;
    let url = support::fresh_db("directtls").await;
    let pem = std::fs::read(&cert).expect("read cert");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.expect("pem")).expect("add root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let tcp = tokio::net::TcpStream::connect(p.addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let db = db_name(&url);
    let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
    for (k, v) in [("user", "postgres"), ("database", db.as_str())] {
        startup.extend_from_slice(k.as_bytes());
        startup.push(0);
        startup.extend_from_slice(v.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let len = startup.len() as i32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    tls.write_all(&startup).await.expect("startup");
    tls.write_all(&query("SELECT 'over direct TLS'"))
        .await
        .expect("query");
    tls.flush().await.expect("flush");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("over direct TLS") {
        let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
            .await
            .expect("answer")
            .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}
