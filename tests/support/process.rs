//! Running the binary from tests: spawn it (to kill it with SIGKILL), wait for it with a
//! deadline, run it to the end and read its exit code and output, and read the run's state.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{binary, wait_until};

/// `args` for a `run` or `apply` of a test about carrying ALTERs out: with `--allow-breaking`
/// (no application depends on the test table's old shape; tests/breaking.rs tests the refusal).
pub fn allowing_breaking<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut args = args.to_vec();
    if matches!(args.first(), Some(&"run") | Some(&"apply")) && !args.contains(&"--allow-breaking")
    {
        args.insert(1, "--allow-breaking");
    }
    args
}

/// `shadow-alter <args>` against `url`, in the background (logs on the test's stderr); a `run`
/// or `apply` gets `--allow-breaking`.
pub fn spawn(url: &str, args: &[&str]) -> Child {
    Command::new(binary())
        .args(allowing_breaking(args))
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "shadow_alter=info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the binary")
}

/// Wait for the child to exit within `limit`; None if it still runs.
pub async fn exited(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for the run") {
            return Some(status);
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILL, and reap it.
pub fn kill(mut child: Child) {
    child.kill().expect("kill -9");
    let _ = child.wait();
}

/// Run `shadow-alter <args>` to its end: exit code and everything it printed; a `run` or
/// `apply` gets `--allow-breaking`.
pub async fn output(url: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    output_as_is(url, &allowing_breaking(args), env).await
}

/// `output` with exactly `args`.
pub async fn output_as_is(url: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(binary())
            .args(&args)
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "shadow_alter=info")
            .envs(env)
            .output()
            .expect("run the binary");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .expect("the binary's task")
}

/// Wait until the copy has checkpointed at least one chunk.
pub async fn wait_for_watermark(c: &Client) {
    wait_until(Duration::from_secs(60), "the watermark to move", || async {
        c.query_opt(
            "SELECT 1 FROM shadow_alter.checkpoints WHERE watermark IS NOT NULL",
            &[],
        )
        .await
        .map(|r| r.is_some())
        .unwrap_or(false)
    })
    .await;
}

/// The phase of the run on `table` (`-` when there is none).
pub async fn phase(c: &Client, table: &str) -> String {
    c.query_opt(
        "SELECT phase FROM shadow_alter.migrations WHERE table_name = $1",
        &[&table],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get(0))
    .unwrap_or_else(|| "-".into())
}
