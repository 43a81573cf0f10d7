//! CPU and memory of processes, read from `/proc`: CPU time used over a window (user + system,
//! every thread) and the largest resident set seen while sampling.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 on Linux).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds `pid` has used so far.
fn cpu_seconds(pid: u32, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// Resident set size of `pid`, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The processes to watch: name → pids (a name such as `postgres` can stand for several).
#[derive(Debug, Clone, Default)]
pub struct Watched(pub BTreeMap<String, Vec<u32>>);

impl Watched {
    pub fn add(&mut self, name: &str, pid: u32) {
        self.0.entry(name.to_owned()).or_default().push(pid);
    }

    /// Adds the Postgres server's own processes, as `postgres`: the postmaster and what
    /// `pg_stat_activity` lists that is not a client's backend (checkpointer, background and WAL
    /// writers, autovacuum launcher). With the stack's backends, that is what Postgres costs.
    pub async fn add_postgres_server(&mut self, admin: &PgPool) {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'",
        )
        .fetch_all(admin)
        .await
        .unwrap_or_default();
        let own: Option<i32> = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(admin)
            .await
            .ok();
        // The postmaster is every backend's parent.
        if let Some(postmaster) = own.and_then(|pid| parent_pid(pid as u32)) {
            self.add("postgres", postmaster);
        }
        for pid in pids {
            self.add("postgres", pid as u32);
        }
    }

    /// Adds the Postgres backends serving `databases` (the stack's connections), as `postgres`.
    pub async fn add_postgres_backends(&mut self, admin: &PgPool, databases: &[&str]) {
        let names: Vec<String> = databases.iter().map(|d| d.to_string()).collect();
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = ANY($1)")
                .bind(&names)
                .fetch_all(admin)
                .await
                .unwrap_or_default();
        for pid in pids {
            self.add("postgres", pid as u32);
        }
    }
}

/// The parent of `pid` (field 4 of `/proc/<pid>/stat`).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What each watched process used over a window.
#[derive(Debug, Clone)]
pub struct Usage {
    pub wall: Duration,
    /// name → (CPU seconds used, largest RSS seen in MiB, summed over its pids)
    pub per_process: BTreeMap<String, (f64, f64)>,
}

impl Usage {
    /// Percent of one core, per process.
    pub fn cpu_percent(&self, name: &str) -> f64 {
        self.per_process
            .get(name)
            .map_or(0.0, |(cpu, _)| 100.0 * cpu / self.wall.as_secs_f64())
    }

    pub fn total_cpu_percent(&self) -> f64 {
        self.per_process.keys().map(|n| self.cpu_percent(n)).sum()
    }

    /// CPU milliseconds `name` used per unit of work, for `units` done in the window.
    pub fn cpu_ms_per(&self, name: &str, units: usize) -> f64 {
        self.per_process
            .get(name)
            .map_or(0.0, |(cpu, _)| 1000.0 * cpu / units.max(1) as f64)
    }

    pub fn max_rss(&self, name: &str) -> f64 {
        self.per_process.get(name).map_or(0.0, |(_, rss)| *rss)
    }

    pub fn json(&self) -> Value {
        let processes: serde_json::Map<String, Value> = self
            .per_process
            .keys()
            .map(|name| {
                (
                    name.clone(),
                    json!({
                        "cpu_percent_of_one_core": super::stats::round(self.cpu_percent(name)),
                        "max_rss_mib": super::stats::round(self.max_rss(name)),
                    }),
                )
            })
            .collect();
        json!({
            "seconds": super::secs(self.wall),
            "total_cpu_percent_of_one_core": super::stats::round(self.total_cpu_percent()),
            "processes": processes,
        })
    }

    pub fn describe(&self) -> String {
        self.per_process
            .keys()
            .map(|name| {
                format!(
                    "{name} {:.1}% CPU, {:.0} MiB",
                    self.cpu_percent(name),
                    self.max_rss(name)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Measures what `watched` uses while `work` runs, sampling RSS every 250 ms.
pub async fn measure<T>(watched: &Watched, work: impl Future<Output = T>) -> (T, Usage) {
    let ticks = ticks_per_second();
    let cpu_now = |pids: &[u32]| -> Vec<Option<f64>> {
        pids.iter().map(|p| cpu_seconds(*p, ticks)).collect()
    };
    let start_cpu: BTreeMap<String, Vec<Option<f64>>> = watched
        .0
        .iter()
        .map(|(n, pids)| (n.clone(), cpu_now(pids)))
        .collect();
    let started = Instant::now();
    let mut max_rss: BTreeMap<String, f64> = BTreeMap::new();
    let sample = |max_rss: &mut BTreeMap<String, f64>| {
        for (name, pids) in &watched.0 {
            let rss: f64 = pids.iter().filter_map(|p| rss_mib(*p)).sum();
            let seen = max_rss.entry(name.clone()).or_default();
            *seen = seen.max(rss);
        }
    };
    sample(&mut max_rss);
    tokio::pin!(work);
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let output = loop {
        tokio::select! {
            output = &mut work => break output,
            _ = ticker.tick() => sample(&mut max_rss),
        }
    };
    sample(&mut max_rss);
    let wall = started.elapsed();
    let per_process = watched
        .0
        .iter()
        .map(|(name, pids)| {
            // A pid gone meanwhile (a pooled connection closed) is left out rather than guessed.
            let used: f64 = start_cpu[name]
                .iter()
                .zip(cpu_now(pids))
                .filter_map(|(before, after)| Some(after? - (*before)?))
                .sum();
            (
                name.clone(),
                (used, max_rss.get(name).copied().unwrap_or(0.0)),
            )
        })
        .collect();
    (output, Usage { wall, per_process })
}
