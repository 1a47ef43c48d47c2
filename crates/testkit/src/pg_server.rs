//! A private PostgreSQL 15 cluster for tests that stop and start the server (the
//! shared cluster of `scripts/test` must never be stopped): `initdb` into a new
//! temporary folder, a free port on 127.0.0.1, `pg_ctl` to stop (`-m immediate`,
//! as a crash would) and start again on the same folder and port. Dropping it stops
//! the server (its postmaster killed by pid if `pg_ctl` cannot) and removes the
//! folder. `initdb` and `postgres` refuse to run as root: as root they run as the
//! `postgres` user (`runuser -u postgres --`).
//!
//! [`PgServer::replica_of`] makes a streaming replica of one (`pg_basebackup -R`
//! into its own folder, on its own port), optionally applying the WAL late
//! (`recovery_min_apply_delay`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Where Debian's PostgreSQL 15 binaries live (`PGBIN` overrides).
fn pg_bin(tool: &str) -> PathBuf {
    let dir = std::env::var_os("PGBIN").map_or_else(
        || PathBuf::from("/usr/lib/postgresql/15/bin"),
        PathBuf::from,
    );
    dir.join(tool)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root.
fn run_pg(tool: &str, args: &[&str]) -> Output {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        c
    } else {
        Command::new(pg_bin(tool))
    };
    command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (install postgresql-15): {e}"))
}

fn check(tool: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{tool} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A throwaway PostgreSQL server of the test's own.
#[derive(Debug)]
pub struct PgServer {
    base: PathBuf,
    data: PathBuf,
    pub port: u16,
}

fn owned_temp_dir() -> PathBuf {
    let base = crate::temp_dir("scaleshop-pg");
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&base)
            .status()
            .expect("chown");
        assert!(status.success(), "chown the cluster folder to postgres");
    }
    base
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl PgServer {
    /// A streaming replica of `primary` (`pg_basebackup -R -X stream`), started
    /// on a free port; `apply_delay` holds back each commit that long
    /// (`recovery_min_apply_delay`). Waits until it accepts connections.
    pub fn replica_of(primary: &PgServer, apply_delay: Option<Duration>) -> Self {
        let base = owned_temp_dir();
        let data = base.join("data");
        let data_arg = data.to_string_lossy().into_owned();
        let primary_port = primary.port.to_string();
        let backup = run_pg(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port,
                "-U",
                "postgres",
                "-D",
                &data_arg,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        check("pg_basebackup", &backup);
        let port = free_port();
        // The copied postgresql.conf names the primary's port: the last line wins.
        let mut settings = format!("\nport = {port}\nhot_standby_feedback = on\n");
        if let Some(delay) = apply_delay {
            settings.push_str(&format!(
                "recovery_min_apply_delay = '{}ms'\n",
                delay.as_millis()
            ));
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&settings);
        std::fs::write(&conf, text).expect("write postgresql.conf");
        let server = Self { base, data, port };
        server.start_again();
        server
    }

    /// `kill -9` of the postmaster, as a crash of the machine's database would
    /// look to clients (its backends notice and exit).
    pub fn kill(&self) {
        if let Some(pid) = Self::postmaster_pid(&self.data) {
            let status = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill -9 the postmaster");
        }
    }

    /// `initdb` and start on a free port; waits until it accepts connections.
    pub fn start() -> Self {
        let base = owned_temp_dir();
        let data = base.join("data");
        let data_arg = data.to_string_lossy().into_owned();
        let init = run_pg(
            "initdb",
            &[
                "-D",
                &data_arg,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        check("initdb", &init);
        let port = free_port();
        // TCP only (a socket path under a deep temporary folder can be too long).
        // Durable commits (synchronous_commit stays on): an immediate stop must not
        // lose an acknowledged transaction. No fsync: the machine does not crash.
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n\
             max_connections = 200\nfsync = off\nfull_page_writes = off\n"
        );
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&settings);
        // Written by us (root or not) into a file the server only reads.
        std::fs::write(&conf, text).expect("write postgresql.conf");
        let server = Self { base, data, port };
        server.start_again();
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn log(&self) -> PathBuf {
        self.base.join("postgres.log")
    }

    /// Starts the server on its folder and port (again, after a stop); waits until
    /// it accepts connections (bounded).
    pub fn start_again(&self) {
        let data = self.data.to_string_lossy().into_owned();
        let log = self.log().to_string_lossy().into_owned();
        let output = run_pg(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        );
        if !output.status.success() {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            panic!(
                "pg_ctl start failed: {}{}\n{log}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `pg_ctl stop -m immediate`: every backend ends at once, nothing is shut
    /// down cleanly (the next start recovers from the WAL).
    pub fn stop_immediate(&self) {
        let data = self.data.to_string_lossy().into_owned();
        let output = run_pg(
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "-t", "30", "stop"],
        );
        check("pg_ctl stop", &output);
    }

    /// The postmaster's pid, while it runs (the first line of `postmaster.pid`).
    fn postmaster_pid(data: &Path) -> Option<u32> {
        std::fs::read_to_string(data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(pid) = Self::postmaster_pid(&self.data) {
            let data = self.data.to_string_lossy().into_owned();
            let stopped = run_pg(
                "pg_ctl",
                &["-D", &data, "-m", "immediate", "-w", "-t", "10", "stop"],
            );
            // Killed already (`kill`), the pid may be someone else's by now.
            let still_postgres = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim() == "postgres");
            if !stopped.status.success() && still_postgres {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
