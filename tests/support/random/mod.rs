//! A randomized, seeded property test of the engine: one iteration is one random table, one
//! random ALTER, mirrored random writers, random interruptions (SIGKILL of the binary, a server
//! restart, a death right after the swap) with the same command rerun, then the table compared
//! with the mirror altered by plain DDL, and nothing of ours left behind. Everything random is
//! drawn from the seed (timings of kills too), so `SEED=<n>` replays one case.

pub mod alter;
pub mod check;
pub mod shape;
pub mod writers;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use crate::support::{binary, connect, fresh_db, server};
use alter::{Added, Alter, AlterKind, Effect, Target};
use check::{problem, Class, Problem};
use shape::{lit, q, Shape, PROTECTED};

/// Table sizes: the same in the short and the long mode, so `SEED=<n>` replays a soak case.
const MIN_ROWS: i64 = 2_000;
const MAX_ROWS: i64 = 5_000;

/// The result of one iteration.
pub struct Report {
    pub seed: u64,
    pub class: Class,
    pub problems: Vec<Problem>,
    /// one line: seed, class, what was run
    pub line: String,
    /// DDL, ALTER, problems and the run's log tail (printed when the class is not ok)
    pub details: String,
}

#[derive(Clone, Copy, Debug)]
enum When {
    /// once the run's phase has this rank (see `rank`), plus this many ms
    Phase(usize, u64),
    /// this many ms after the start
    After(u64),
}

#[derive(Clone, Copy, Debug)]
enum Interrupt {
    Kill(When),
    Restart(When),
    /// the test hook that aborts the process right after the swap committed
    DieAfterSwap,
}

const PHASES: [&str; 6] = ["shadow", "copy", "indexes", "catch-up", "verify", "cutover"];

fn rank(phase: &str) -> Option<usize> {
    match phase {
        "shadow" => Some(0),
        "copy" => Some(1),
        "indexes" => Some(2),
        "catch-up" => Some(3),
        "verify" | "waiting" => Some(4),
        "cutover" => Some(5),
        _ => None,
    }
}

impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            When::Phase(r, ms) => write!(f, "{}+{ms}ms", PHASES[*r]),
            When::After(ms) => write!(f, "{ms}ms"),
        }
    }
}

impl std::fmt::Display for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Interrupt::Kill(w) => write!(f, "kill@{w}"),
            Interrupt::Restart(w) => write!(f, "restart@{w}"),
            Interrupt::DieAfterSwap => write!(f, "die-after-swap"),
        }
    }
}

fn random_when(rng: &mut StdRng) -> When {
    if rng.gen_bool(0.6) {
        let r = [1, 1, 2, 3, 5][rng.gen_range(0..5)];
        When::Phase(r, rng.gen_range(0..120))
    } else {
        When::After(rng.gen_range(50..1500))
    }
}

fn random_plan(rng: &mut StdRng, kind: AlterKind) -> Vec<Interrupt> {
    let roll = rng.gen_range(0..100);
    match roll {
        0..=24 => vec![],
        25..=59 => vec![Interrupt::Kill(random_when(rng))],
        60..=74 => vec![Interrupt::Restart(random_when(rng))],
        75..=89 => {
            let second = if rng.gen_bool(0.5) {
                Interrupt::Kill(random_when(rng))
            } else {
                Interrupt::Restart(random_when(rng))
            };
            vec![Interrupt::Kill(random_when(rng)), second]
        }
        _ if kind != AlterKind::Probe => vec![Interrupt::DieAfterSwap],
        _ => vec![Interrupt::Kill(random_when(rng))],
    }
}

/// How the binary is run.
struct RunSpec {
    args: Vec<String>,
    strategy: &'static str,
    drop_old: bool,
    verify: bool,
}

fn log_path(seed: u64) -> PathBuf {
    let dir = std::env::temp_dir().join("shadow-alter-random");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("seed-{seed}.log"))
}

fn spawn(url: &str, spec: &RunSpec, log: &PathBuf, header: &str, die_after_swap: bool) -> Child {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the run's log");
    let _ = writeln!(f, "===== {header}");
    let err = f.try_clone().expect("log file handle");
    let mut cmd = Command::new(binary());
    cmd.args(&spec.args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "shadow_alter=info")
        .stdout(Stdio::from(f))
        .stderr(Stdio::from(err));
    if die_after_swap {
        cmd.env("SHADOW_ALTER_TEST_DIE_AFTER_SWAP", "1");
    }
    cmd.spawn().expect("start the binary")
}

/// A control connection that reconnects after a server restart.
struct Ctl {
    url: String,
    c: Option<Client>,
}

impl Ctl {
    async fn client(&mut self) -> Option<&Client> {
        if self.c.as_ref().is_none_or(|c| c.is_closed()) {
            self.c = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .ok()
                .map(|(c, conn)| {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    c
                });
        }
        self.c.as_ref()
    }

    async fn phase(&mut self) -> String {
        let Some(c) = self.client().await else {
            return "-".into();
        };
        check::state(c)
            .await
            .map(|(p, _)| p)
            .unwrap_or_else(|| "-".into())
    }
}

async fn exited(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait for the moment of an interruption; Some(status) if the run ended before it.
async fn wait_when(child: &mut Child, ctl: &mut Ctl, when: When) -> Option<ExitStatus> {
    let start = Instant::now();
    match when {
        When::After(ms) => exited(child, Duration::from_millis(ms)).await,
        When::Phase(r, ms) => {
            loop {
                if let Ok(Some(s)) = child.try_wait() {
                    return Some(s);
                }
                if rank(&ctl.phase().await).is_some_and(|p| p >= r) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(120) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            exited(child, Duration::from_millis(ms)).await
        }
    }
}

fn describe_status(s: &ExitStatus) -> String {
    match s.code() {
        Some(c) => format!("exit {c}"),
        None => "killed by a signal".into(),
    }
}

/// Attempts of the same command until it finishes: (final status or None when it hung or
/// could not finish, what happened, whether a rerun was refused).
struct Attempts {
    status: Option<ExitStatus>,
    story: Vec<String>,
    refused: Vec<String>,
}

async fn run_attempts(url: &str, spec: &RunSpec, plan: Vec<Interrupt>, log: &PathBuf) -> Attempts {
    let mut ctl = Ctl {
        url: url.to_string(),
        c: None,
    };
    let mut plan: VecDeque<Interrupt> = plan.into();
    let mut story = Vec::new();
    let mut refused = Vec::new();
    let mut n = 0;
    loop {
        n += 1;
        if n > 8 {
            story.push("gave up after 8 attempts".into());
            return Attempts {
                status: None,
                story,
                refused,
            };
        }
        // a killed run whose work was complete needs no rerun
        if n > 1 && ctl.phase().await == "done" {
            story.push("(phase done: no rerun)".into());
            return Attempts {
                status: None,
                story,
                refused,
            }
            .done_ok();
        }
        let intr = plan.pop_front();
        let header = format!(
            "attempt {n}: {}",
            intr.map(|i| i.to_string())
                .unwrap_or_else(|| "to the end".into())
        );
        let mut child = spawn(
            url,
            spec,
            log,
            &header,
            matches!(intr, Some(Interrupt::DieAfterSwap)),
        );
        let status = match intr {
            None | Some(Interrupt::DieAfterSwap) => {
                match exited(&mut child, Duration::from_secs(240)).await {
                    Some(s) => s,
                    None => {
                        let phase = ctl.phase().await;
                        let _ = child.kill();
                        let _ = child.wait();
                        story.push(format!("hung for 240 s in phase {phase}: killed"));
                        return Attempts {
                            status: None,
                            story,
                            refused,
                        };
                    }
                }
            }
            Some(Interrupt::Kill(when)) => match wait_when(&mut child, &mut ctl, when).await {
                Some(s) => s,
                None => {
                    let phase = ctl.phase().await;
                    let _ = child.kill();
                    let _ = child.wait();
                    story.push(format!("killed in {phase}"));
                    continue;
                }
            },
            Some(Interrupt::Restart(when)) => match wait_when(&mut child, &mut ctl, when).await {
                Some(s) => s,
                None => {
                    let phase = ctl.phase().await;
                    let restarted = tokio::task::spawn_blocking(|| server().restart()).await;
                    if restarted.is_err() {
                        story.push("server restart failed".into());
                    }
                    let s = exited(&mut child, Duration::from_secs(60)).await;
                    if s.is_none() {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    story.push(format!(
                        "restart in {phase} -> {}",
                        s.map(|s| describe_status(&s))
                            .unwrap_or_else(|| "still running after 60 s: killed".into())
                    ));
                    // a run that still finished needs no rerun (a DBA would not rerun it)
                    if let Some(s) = s.filter(|s| s.success()) {
                        return Attempts {
                            status: Some(s),
                            story,
                            refused,
                        };
                    }
                    continue;
                }
            },
        };
        if status.success() {
            story.push(format!("{header}: exit 0"));
            return Attempts {
                status: Some(status),
                story,
                refused,
            };
        }
        let tail = log_tail(log, 3);
        if status.code() == Some(3) && tail.contains("already") && refused.len() < 3 {
            refused.push(format!("attempt {n}: {}", last_error(&tail)));
            story.push(format!("{header}: exit 3 (refused)"));
            // wait for the killed run's sessions to go away, then run again
            if let Some(c) = ctl.client().await {
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(20) {
                    let busy: i64 = c
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                               AND application_name LIKE 'shadow-alter%' AND pid <> pg_backend_pid()",
                            &[],
                        )
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0);
                    if busy == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if let Some(i) = intr {
                plan.push_front(i);
            }
            continue;
        }
        if matches!(intr, Some(Interrupt::DieAfterSwap)) && status.code().is_none() {
            story.push(format!("{header}: died after the swap"));
            continue;
        }
        story.push(format!("{header}: {}", describe_status(&status)));
        return Attempts {
            status: Some(status),
            story,
            refused,
        };
    }
}

impl Attempts {
    fn done_ok(mut self) -> Attempts {
        use std::os::unix::process::ExitStatusExt;
        self.status = Some(ExitStatus::from_raw(0));
        self
    }
}

/// The last lines of the run's log, without terminal colours.
fn log_tail(log: &PathBuf, lines: usize) -> String {
    let raw = std::fs::read_to_string(log).unwrap_or_default();
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            text.push(ch);
        }
    }
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn last_error(tail: &str) -> String {
    tail.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .or_else(|| {
            tail.lines()
                .rev()
                .find(|l| l.contains("ERROR") || l.contains("error"))
        })
        .unwrap_or_else(|| tail.lines().last().unwrap_or(""))
        .chars()
        .take(700)
        .collect()
}

async fn try_sql(c: &Client, sql: &str) -> Result<(), String> {
    c.batch_execute(sql).await.map_err(|e| {
        let _ = e.code();
        e.as_db_error()
            .map(|d| format!("{}: {}", d.code().code(), d.message()))
            .unwrap_or_else(|| e.to_string())
    })
}

/// The plain ALTER on the mirror inside a rolled-back transaction: does the data fit?
async fn plain_fits(c: &Client, mirror: &str, body: &str) -> Result<(), String> {
    let r = try_sql(c, &format!("BEGIN; ALTER TABLE {mirror} {body}")).await;
    let _ = c.batch_execute("ROLLBACK").await;
    r
}

/// Drop the iteration's database, with its slots (a leaked slot would keep WAL forever).
async fn drop_db(url: &str) {
    let db = url.rsplit('/').next().unwrap_or_default().to_string();
    let c = connect(&server().url).await;
    for _ in 0..50 {
        let _ = c
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db],
            )
            .await;
        let _ = c
            .query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active",
                &[&db],
            )
            .await;
        let _ = c
            .query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
                &[&db],
            )
            .await;
        if c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", q(&db)))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("could not drop database {db}");
}

/// One iteration for `seed`.
pub async fn iteration(seed: u64) -> Report {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = rng.gen_range(MIN_ROWS..=MAX_ROWS);
    let shape = Shape::generate(&mut rng, rows);
    let url = fresh_db(&format!("rnd{seed}")).await;
    let mut details = String::new();
    let _ = writeln!(details, "  table:\n{}", indent(&shape.create_sql("public")));
    let _ = write!(details, "{}", indent(&shape.after_fill_sql("public")));
    let result = body(seed, &url, &shape, &mut rng, &mut details).await;
    drop_db(&url).await;
    let (problems, summary, ok_run) = match result {
        Ok(r) => r,
        Err(e) => (
            vec![problem(
                Class::Harness,
                format!("harness: {}", check::normalize(&e)),
                e,
            )],
            format!("{} rows={rows}", shape.describe()),
            false,
        ),
    };
    let class = problems.iter().map(|p| p.class).min().unwrap_or(if ok_run {
        Class::Equal
    } else {
        Class::PlainFailsRunFails
    });
    let line = format!(
        "seed={seed} [{}] {:.1}s {summary}",
        class.label(),
        started.elapsed().as_secs_f64()
    );
    for p in &problems {
        let _ = writeln!(details, "  * {} [{}]: {}", p.class.label(), p.sig, p.text);
    }
    Report {
        seed,
        class,
        problems,
        line,
        details,
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

type BodyResult = Result<(Vec<Problem>, String, bool), String>;

async fn body(
    seed: u64,
    url: &str,
    shape: &Shape,
    rng: &mut StdRng,
    details: &mut String,
) -> BodyResult {
    let db = url.rsplit('/').next().unwrap_or_default().to_string();
    {
        let c = connect(url).await;
        try_sql(
            &c,
            &format!(
                "CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');
                 CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0);
                 CREATE SCHEMA mirror; CREATE SCHEMA scratch;
                 ALTER DATABASE {} SET timezone = {}",
                q(&db),
                lit(shape.timezone)
            ),
        )
        .await
        .map_err(|e| format!("setup: {e}"))?;
    }
    let c = connect(url).await;
    let empty = format!(
        "{}{}",
        shape.create_sql("scratch"),
        shape.after_fill_sql("scratch")
    );
    let r = try_sql(&c, &format!("BEGIN; {empty}")).await;
    let _ = c.batch_execute("ROLLBACK").await;
    r.map_err(|e| format!("the generated table is invalid: {e}"))?;

    // an ALTER the server accepts on an empty copy
    let mut rejected = Vec::new();
    let alter: Alter = loop {
        let a = alter::generate(shape, rng);
        let r = try_sql(
            &c,
            &format!(
                "BEGIN; {empty} ALTER TABLE {} {}",
                shape.qualified("scratch"),
                a.body()
            ),
        )
        .await;
        let _ = c.batch_execute("ROLLBACK").await;
        match r {
            Ok(()) => break a,
            Err(e) => {
                rejected.push(format!("{} -> {e}", a.body()));
                if rejected.len() >= 80 {
                    return Err(format!("no valid ALTER in 80 draws; last: {rejected:?}"));
                }
            }
        }
    };
    let body_sql = alter.body();
    let _ = writeln!(details, "  alter: {body_sql}");

    let strategy = match alter.kind {
        AlterKind::Probe => "auto",
        AlterKind::RenameOnly => "shadow-copy",
        AlterKind::Rewrite if rng.gen_bool(0.2) => "auto",
        AlterKind::Rewrite => "shadow-copy",
    };
    let drop_old = rng.gen_bool(0.5);
    let verify = rng.gen_bool(0.2);
    // the copy of a few thousand rows spans about 0.2-2 s, so kills land in it
    let chunk = (shape.rows / rng.gen_range(15..60)).max(50);
    let pause = [5, 10, 20][rng.gen_range(0..3)];
    let nwriters = rng.gen_range(2..=4);
    let plant = alter.plant.clone();
    let truncate = plant.is_none() && rng.gen_bool(0.4);
    let plan = random_plan(rng, alter.kind);
    let writer_seed = rng.gen::<u64>();

    let mut args: Vec<String> = [
        "run",
        // the oracle is the plain ALTER, whether it breaks old code or not
        "--allow-breaking",
        "--table",
        &shape.qualified("public"),
        "--alter",
        &body_sql,
        "--strategy",
        strategy,
        "--chunk-size",
        &chunk.to_string(),
        "--chunk-pause",
        &format!("{pause}ms"),
        "--lock-timeout",
        "500ms",
        "--progress",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if drop_old {
        args.push("--drop-old".into());
    }
    if verify {
        args.push("--verify".into());
    }
    let spec = RunSpec {
        args,
        strategy,
        drop_old,
        verify,
    };

    // the table and its mirror, the same rows
    let t = shape.qualified("public");
    let m = shape.qualified("mirror");
    try_sql(
        &c,
        &format!(
            "{}{}{}",
            shape.create_sql("public"),
            shape.create_sql("mirror"),
            shape.fill_sql()
        ),
    )
    .await
    .map_err(|e| format!("creating and filling the tables: {e}"))?;
    let protected = shape.key.val(PROTECTED);
    if let Some(p) = &plant {
        let col = q(&shape.cols[p.col].name);
        let r = try_sql(
            &c,
            &format!(
                "BEGIN; UPDATE {t} SET {col} = {v} WHERE {k}; UPDATE {m} SET {col} = {v} WHERE {k}; COMMIT",
                v = p.value,
                k = shape.key_cond(&protected, &shape.key.names)
            ),
        )
        .await;
        if let Err(e) = r {
            let _ = c.batch_execute("ROLLBACK").await;
            let _ = writeln!(details, "  (plant {} = {} impossible: {e})", col, p.value);
        } else {
            let _ = writeln!(
                details,
                "  planted: {col} = {} at the protected row",
                p.value
            );
        }
    }
    try_sql(
        &c,
        &format!(
            "{}{}ANALYZE {t}; ANALYZE {m};",
            shape.after_fill_sql("public"),
            shape.after_fill_sql("mirror")
        ),
    )
    .await
    .map_err(|e| format!("after the fill: {e}"))?;
    let fits_before = plain_fits(&c, &m, &body_sql).await;

    let wspec = writers::Spec::new(shape, &alter);
    let w = writers::start(url, wspec, nwriters, writer_seed);
    if !w.wait_more(30, Duration::from_secs(20)).await {
        let stats = w.stop().await;
        return Err(format!("the writers do not write: {stats:?}"));
    }

    let log = log_path(seed);
    let _ = std::fs::remove_file(&log);
    let plan_text: Vec<String> = plan.iter().map(|i| i.to_string()).collect();
    // the TRUNCATE (if any) comes a little after the start, mostly during the copy
    let arm = w.truncates();
    let arm_after = Duration::from_millis(rng.gen_range(50..600));
    let armer = tokio::spawn(async move {
        if truncate {
            tokio::time::sleep(arm_after).await;
            arm.store(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let attempts = run_attempts(url, &spec, plan, &log).await;
    armer.abort();
    let run_ok = attempts.status.is_some_and(|s| s.success());
    if run_ok {
        // writes after the swap go to the new table
        w.wait_more(60, Duration::from_secs(15)).await;
    }
    let stats = w.stop().await;

    let summary = format!(
        "rows={} writers={nwriters} {} chunk={chunk}/{pause}ms{}{}{} plan=[{}] -> {} | tx={} rb={} err={:?}{} | {} | alter: {}",
        shape.rows,
        spec.strategy,
        if spec.drop_old { " drop-old" } else { "" },
        if spec.verify { " verify" } else { "" },
        if truncate { " truncate" } else { "" },
        plan_text.join(", "),
        attempts.story.join("; "),
        stats.committed,
        stats.rolled_back,
        stats.errors,
        if stats.reconnects > 0 { format!(" reconnects={}", stats.reconnects) } else { String::new() },
        shape.describe(),
        alter.describe(),
    );
    let _ = writeln!(details, "  run: {}", spec.args.join(" "));
    let _ = writeln!(details, "  story: {}", attempts.story.join("; "));
    let _ = writeln!(
        details,
        "  log ({}), last lines:\n{}",
        log.display(),
        indent(&log_tail(&log, 25))
    );

    let c = connect(url).await;
    let mut problems = Vec::new();
    for r in &attempts.refused {
        problems.push(problem(
            Class::RerunRefused,
            "rerun refused after a kill (exit 3)",
            r.clone(),
        ));
    }
    for u in &stats.unexpected {
        problems.push(problem(
            Class::AppErrors,
            format!("writer error {}", u.split(' ').next().unwrap_or_default()),
            format!("writer error: {u}"),
        ));
    }
    // columns with large values, by their names after the ALTER
    let large_pre: Vec<String> = shape
        .cols
        .iter()
        .filter(|c| c.toast.is_some())
        .map(|c| c.name.clone())
        .collect();
    let large_post: Vec<String> = shape
        .cols
        .iter()
        .enumerate()
        .filter(|(_, c)| c.toast.is_some())
        .map(|(i, c)| {
            alter
                .subs
                .iter()
                .find_map(|s| match &s.effect {
                    Effect::Rename(Target::Col(j), to) if *j == i => Some(to.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| c.name.clone())
        })
        .collect();
    let live_key: Vec<String> = {
        let mut k = shape.key.names.clone();
        for s in &alter.subs {
            if let Effect::Rename(Target::Key(i), to) = &s.effect {
                k[*i] = to.clone();
            }
        }
        k
    };
    let err = |e: tokio_postgres::Error| {
        format!(
            "checking: {}",
            e.as_db_error()
                .map(|d| format!("{}: {}", d.code().code(), d.message()))
                .unwrap_or_else(|| e.to_string())
        )
    };

    if run_ok {
        if let Some((phase, msg)) = check::state(&c).await {
            if phase != "done" && alter.kind != AlterKind::Probe {
                problems.push(problem(
                    Class::Leftovers,
                    format!("state row says {phase} after success"),
                    format!("the state row says {phase} ({msg}) after a successful run"),
                ));
            }
        }
        match try_sql(&c, &format!("ALTER TABLE {m} {body_sql}")).await {
            Err(e) => problems.push(problem(
                Class::RunOkPlainFails,
                "run succeeded, plain ALTER fails",
                format!("the run succeeded but the plain ALTER fails: {e} (before the run: {fits_before:?})"),
            )),
            Ok(()) => {
                let ti = check::info(&c, &t).await.map_err(err)?;
                let mi = check::info(&c, &m).await.map_err(err)?;
                check::compare_info(&ti, &mi, &mut problems);
                // rows, apart from the volatile added columns
                let added = alter.added();
                let cols: Vec<String> = c
                    .query(
                        &format!(
                            "SELECT attname::text FROM pg_attribute WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                            lit(&m)
                        ),
                        &[],
                    )
                    .await
                    .map_err(err)?
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .filter(|n| !added.iter().any(|(a, k)| a == n && *k != Added::Comparable))
                    .collect();
                check::compare_rows(&c, &t, &m, &cols, &live_key, &large_post, &mut problems)
                    .await
                    .map_err(err)?;
                for (name, kind) in &added {
                    if *kind == Added::Comparable {
                        continue;
                    }
                    let r = c
                        .query_one(
                            &format!(
                                "SELECT count(*), count({n}), count(DISTINCT {n}) FROM {t}",
                                n = q(name)
                            ),
                            &[],
                        )
                        .await
                        .map_err(err)?;
                    let (all, nonnull, distinct): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
                    if nonnull != all || (*kind == Added::Unique && distinct != all) {
                        problems.push(problem(
                            Class::Differs,
                            "added volatile column: NULLs or duplicates",
                            format!("added column {name}: {all} rows, {nonnull} not null, {distinct} distinct"),
                        ));
                    }
                }
                sequences_ahead(&c, &t, &live_key, &mut problems).await.map_err(err)?;
                check::leftovers(&c, &t, if spec.drop_old { 0 } else { 1 }, &mut problems)
                    .await
                    .map_err(err)?;
            }
        }
    } else {
        // the failed run must have left the table as it was: compare with the unaltered mirror
        let mut changed = Vec::new();
        let ti = check::info(&c, &t).await.map_err(err)?;
        let mi = check::info(&c, &m).await.map_err(err)?;
        check::compare_info(&ti, &mi, &mut changed);
        // rows over the columns both still have (a changed definition is reported above)
        let cols: Vec<String> = c
            .query(
                &format!(
                    "SELECT attname::text FROM pg_attribute WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped
                       AND attname IN (SELECT attname FROM pg_attribute WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped)
                     ORDER BY attnum",
                    lit(&m),
                    lit(&t)
                ),
                &[],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let key_kept = shape.key.names.iter().all(|k| cols.contains(k));
        check::compare_rows(
            &c,
            &t,
            &m,
            &cols,
            if key_kept {
                &shape.key.names
            } else {
                &cols[..cols.len().min(1)]
            },
            &large_pre,
            &mut changed,
        )
        .await
        .map_err(err)?;
        for p in changed {
            problems.push(Problem {
                class: if p.class == Class::NamesDiffer {
                    Class::Differs
                } else {
                    p.class
                },
                sig: format!("failed run changed the table: {}", p.sig),
                text: format!(
                    "after the failed run the table is not as before: {}",
                    p.text
                ),
            });
        }
        check::leftovers(&c, &t, 0, &mut problems)
            .await
            .map_err(err)?;
        let fits_after = try_sql(&c, &format!("ALTER TABLE {m} {body_sql}")).await;
        let how = attempts
            .status
            .map(|s| describe_status(&s))
            .unwrap_or_else(|| "no result".into());
        match (&fits_before, &fits_after) {
            (_, Err(_)) => {}
            (Err(_), Ok(())) => {
                let _ = writeln!(
                    details,
                    "  (the data fitted only after the writers changed it)"
                );
            }
            (Ok(()), Ok(())) => {
                let error = last_error(&log_tail(&log, 40));
                problems.push(problem(
                    Class::RunFailedPlainOk,
                    format!("run failed ({how}): {}", check::normalize(&error)),
                    format!("the run failed ({how}: {error}) but the plain ALTER succeeds"),
                ))
            }
        }
        if fits_after.is_err() && fits_before.is_ok() {
            return Err(format!(
                "the writers made the data unfit for the ALTER: {fits_after:?}"
            ));
        }
    }
    Ok((problems, summary, run_ok))
}

/// Sequences of identity and serial columns (not the key, whose values writers choose) must be
/// ahead of every value in the table, or the next insert collides.
async fn sequences_ahead(
    c: &Client,
    t: &str,
    key: &[String],
    out: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let rows = c
        .query(
            &format!(
                "SELECT a.attname::text, s.oid::regclass::text, coalesce(pg_sequence_last_value(s.oid), 0)
                 FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                 JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                 WHERE d.classid = 'pg_class'::regclass AND d.refobjid = {}::regclass AND d.deptype IN ('a', 'i')
                   AND format_type(a.atttypid, NULL) IN ('smallint', 'integer', 'bigint')",
                lit(t)
            ),
            &[],
        )
        .await?;
    for r in rows {
        let (col, seq, last): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        if key.contains(&col) {
            continue;
        }
        let max: Option<i64> = c
            .query_one(&format!("SELECT max({})::bigint FROM {t}", q(&col)), &[])
            .await?
            .get(0);
        if max.is_some_and(|m| m > last) {
            out.push(problem(
                Class::Differs,
                "sequence behind its column",
                format!("sequence {seq} of column {col} is at {last}, behind the column's maximum {max:?}"),
            ));
        }
    }
    Ok(())
}
