//! Test harness: one throwaway PostgreSQL per test binary, started with `scripts/pg-throwaway`
//! (initdb in a temp dir, wal_level=logical, a free loopback port) and stopped when the binary
//! exits (atexit, plus the script's watchdog if the process is killed). Each test gets its own
//! database, so tests run in parallel without seeing each other.
#![allow(dead_code)]

pub mod migration;
pub mod mitm;
pub mod process;
pub mod proxy;
pub mod range_tree;
pub mod tree;
pub mod workload;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Server {
    pub url: String,
    pub data_dir: PathBuf,
    /// The server binaries (`PG_BIN`, else what `scripts/pg-throwaway` found).
    pub bin_dir: PathBuf,
    pub port: u16,
    /// `postgres --version` of those binaries, e.g. "17.10".
    pub version: String,
}

impl Server {
    /// The major version, e.g. 17.
    pub fn major(&self) -> u32 {
        self.version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("server version {:?}", self.version))
    }
}

/// A client program (psql, pgbench): from the server's bin dir when it has one, else from
/// `PG_CLIENT_BIN`, the newest `/usr/lib/postgresql/*/bin`, or `PATH`. Server packages of other
/// versions (scripts/pg-versions) ship no client programs; the system's client talks to any of them.
pub fn client_tool(name: &str) -> PathBuf {
    let server_own = server().bin_dir.join(name);
    if server_own.is_file() {
        return server_own;
    }
    if let Some(dir) = std::env::var_os("PG_CLIENT_BIN") {
        return PathBuf::from(dir).join(name);
    }
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    debian.sort_by_key(|p| {
        p.components()
            .nth(4)
            .and_then(|c| c.as_os_str().to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    debian.pop().unwrap_or_else(|| PathBuf::from(name))
}

impl Server {
    /// Restart the server (a fast shutdown, as for a maintenance restart); same port and data.
    pub fn restart(&self) {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        let out = cmd
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t", "60", "-l"])
            .arg(self.data_dir.join("server.log"))
            .arg("restart")
            .output()
            .expect("run pg_ctl restart");
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

static SERVER: OnceLock<Server> = OnceLock::new();
static DATA_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_server() {
    if let Some(dir) = DATA_DIR.get() {
        let _ = Command::new(script()).arg("stop").arg(dir).status();
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_file(dir.with_extension("initdb.log"));
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    repo_root().join("scripts/pg-throwaway")
}

/// The server for this test binary, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let s = start_server(&[]);
        // once per test binary, past the test harness's output capture, so CI logs say which
        // server the suite ran against
        let _ = writeln!(
            std::io::stderr(),
            "test server: PostgreSQL {} ({})",
            s.version,
            s.bin_dir.display()
        );
        let _ = DATA_DIR.set(s.data_dir.clone());
        unsafe {
            libc::atexit(stop_server);
        }
        s
    })
}

/// Start another throwaway server with extra settings (for example wal_level=replica). It stops
/// when the test process exits (the script's watchdog).
pub fn start_server(settings: &[(&str, &str)]) -> Server {
    {
        let dir = std::env::temp_dir().join(format!(
            "shadow-alter-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let extra: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .arg("--watch")
            .arg(std::process::id().to_string())
            .env("PG_THROWAWAY_SETTINGS", extra.join("\n"))
            .output()
            .expect("run scripts/pg-throwaway");
        assert!(
            out.status.success(),
            "scripts/pg-throwaway failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap_or_else(|| panic!("pg-throwaway printed no {k}: {text}"))
        };
        let url = get("DATABASE_URL");
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok())
            .expect("port");
        Server {
            url,
            data_dir: dir,
            bin_dir: PathBuf::from(get("PG_BIN")),
            port,
            version: get("SERVER_VERSION"),
        }
    }
}

static DB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh database on the shared server; returns its URL.
pub async fn fresh_db(hint: &str) -> String {
    let s = server();
    let name = format!(
        "t_{}_{}",
        hint.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>(),
        DB_SEQ.fetch_add(1, Ordering::SeqCst)
    );
    let c = connect(&s.url).await;
    c.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let base = s.url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&s.url);
    format!("{base}/{name}")
}

/// A plain tokio-postgres client whose connection task runs in the background.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        // a refused connection to the shared server means it died: say why (disk full, a crash)
        Err(e) => panic!("connect: {e:?}\n{}", server_log_tail()),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// The last lines of the shared server's log, for failure messages.
pub fn server_log_tail() -> String {
    let Some(s) = SERVER.get() else {
        return String::new();
    };
    let log = std::fs::read_to_string(s.data_dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!(
        "last lines of the test server's log ({}):\n{tail}",
        s.data_dir.display()
    )
}

/// Wait until `f` returns true, polling; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path of the built `shadow-alter` binary (for end-to-end tests through the CLI).
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shadow-alter"))
}

/// The qualified name of the shadow table of a run on `table` (in the run's work schema).
pub async fn shadow_of(c: &tokio_postgres::Client, table: &str) -> String {
    c.query_one(
        "SELECT format('\"%s\".\"%s\"', 'shadow_alter_' || c.oid, replace(c.relname, '\"', '\"\"'))
         FROM pg_class c WHERE c.oid = $1::text::regclass",
        &[&table],
    )
    .await
    .expect("the table exists")
    .get(0)
}

/// A single number from a query (`SELECT count(*) ...`).
pub async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

/// The type of a column (`format_type`), None when the column is not there.
pub async fn column_type(c: &tokio_postgres::Client, table: &str, column: &str) -> Option<String> {
    c.query_opt(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = $1::text::regclass AND attname = $2 AND NOT attisdropped",
        &[&table, &column],
    )
    .await
    .expect("column type")
    .map(|r| r.get(0))
}
