//! A Postgres cluster of a test's own, made with Debian's `initdb` and run with `pg_ctl` on a free
//! port, so a test can crash and restart Postgres without disturbing anything else on the machine.
//! As root the server runs as the `postgres` user (Postgres refuses to run as root).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The password of role `saga` on a [`PgCluster::start_with_tls`] cluster.
pub const TLS_ROLE_PASSWORD: &str = "tls-role-secret-7f3a";

pub struct PgCluster {
    pub port: u16,
    data: PathBuf,
    bin: PathBuf,
    /// The server's log, in `dir`: the server's user may not be able to reach `log_dir` (a
    /// checkout in a private directory, as `mktemp -d` makes).
    log: PathBuf,
    /// Where the log is copied when the cluster is dropped, beside the test's other logs.
    log_copy: PathBuf,
    /// uid and gid to run the server as (the `postgres` user when the test runs as root).
    user: Option<(u32, u32)>,
}

impl PgCluster {
    /// Creates a cluster under `dir` (trust authentication, user `postgres`) and starts it on a
    /// free port on 127.0.0.1. Its log ends up in `<log_dir>/postgres.log`.
    pub fn start(dir: &Path, log_dir: &Path) -> anyhow::Result<PgCluster> {
        let bin = server_bin_dir()?;
        let user = if running_as_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir_all(log_dir)?;
        let log = dir.join("postgres.log");
        std::fs::write(&log, "")?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&log, Some(uid), Some(gid))?;
        }
        let cluster = PgCluster {
            port: crate::free_port(),
            data: dir.join("data"),
            bin,
            log,
            log_copy: log_dir.join("postgres.log"),
            user,
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data.to_string_lossy(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        // The port was free a moment ago; another test may have taken it since. Postgres then
        // fails to bind and exits, and another port is tried.
        let mut cluster = cluster;
        for _ in 0..5 {
            std::fs::write(&cluster.log, "")?;
            match cluster.pg_ctl_start() {
                Err(_) if std::fs::read_to_string(&cluster.log)?.contains("already in use") => {
                    cluster.port = crate::free_port();
                }
                started => return started.map(|()| cluster),
            }
        }
        bail!("5 ports were taken by the time Postgres started on them")
    }

    /// Like [`PgCluster::start`], with TLS: a certificate for `localhost` signed by a CA of the
    /// cluster's own ([`PgCluster::ca_file`]), and role `saga` (a superuser with password
    /// [`TLS_ROLE_PASSWORD`]) allowed in over TLS only, with SCRAM; `postgres` keeps plain
    /// connections for the test's own housekeeping.
    pub fn start_with_tls(dir: &Path, log_dir: &Path) -> anyhow::Result<PgCluster> {
        let cluster = PgCluster::start(dir, log_dir)?;
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        crate::tls::make_ca_and_server_cert(&tls, "ca", Some("server"))?;
        // The server's copies, owned by the server's user with the key private to it.
        for (from, to) in [("server.crt", "server.crt"), ("server.key", "server.key")] {
            let target = cluster.data.join(to);
            std::fs::copy(tls.join(from), &target)?;
            if let Some((uid, gid)) = cluster.user {
                std::os::unix::fs::chown(&target, Some(uid), Some(gid))?;
            }
            std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(cluster.data.join("postgresql.conf"))?;
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )?;
        std::fs::write(
            cluster.data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all saga 127.0.0.1/32 scram-sha-256\n\
             hostnossl all saga 127.0.0.1/32 reject\n\
             host all postgres 127.0.0.1/32 trust\n",
        )?;
        cluster.run(
            "pg_ctl",
            &["-D", &cluster.data.to_string_lossy(), "-m", "fast", "stop"],
        )?;
        cluster.pg_ctl_start()?;
        cluster.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &cluster.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                &format!("CREATE ROLE saga LOGIN SUPERUSER PASSWORD '{TLS_ROLE_PASSWORD}'"),
            ],
        )?;
        Ok(cluster)
    }

    /// The CA that signed the TLS cluster's certificate (see [`PgCluster::start_with_tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.data.with_file_name("tls").join("ca.crt")
    }

    /// `postgres://postgres@127.0.0.1:<port>`, without a database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Stops the server in immediate mode (every backend killed, no checkpoint: crash recovery
    /// at the next start), as a crash or an operator's `pg_ctl -m immediate` does.
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-m",
                "immediate",
                "stop",
            ],
        )
    }

    /// Starts the server again (after [`PgCluster::stop_immediate`]) and waits until it accepts
    /// connections.
    pub fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=300 -c fsync=off",
            self.port,
            self.data.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-l",
                &self.log.to_string_lossy(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut command = Command::new(self.bin.join(program));
        command.args(args).stdin(Stdio::null());
        if let Some(dir) = self.data.parent() {
            // A working directory the server's user can enter (the test's may be private).
            command.current_dir(dir);
        }
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid).env("HOME", "/tmp");
        }
        let output = command
            .output()
            .with_context(|| format!("running {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
        let _ = std::fs::copy(&self.log, &self.log_copy);
        if let Some(dir) = self.data.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb` (Debian's layout).
fn server_bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("reading /usr/lib/postgresql (Debian's Postgres server packages)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no /usr/lib/postgresql/<version>/bin/initdb: install Debian's postgresql package")
}

fn running_as_root() -> bool {
    // The effective uid, read from /proc (no libc dependency for one number).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .context("running as root, and there is no postgres user to run the server as")
}
