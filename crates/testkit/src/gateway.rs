//! The HAProxy gateway of a split deployment, configured exactly as
//! `scripts/cluster up` configures it: the script is sourced and its
//! `render_gateway` writes the configuration from `deploy/haproxy/haproxy.cfg.in`.
//! Killed (by pid) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One instance behind the gateway: its name, its target and its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub target: String,
    pub port: u16,
}

/// A running `haproxy -db` in front of a plan of instances.
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    pub port: u16,
    pub stats_port: u16,
    pub log: PathBuf,
}

/// `scripts/cluster`, the local cluster launcher.
pub fn cluster_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster")
}

/// A port of 127.0.0.1 that was free a moment ago, below the kernel's ephemeral
/// range (32768 and up on Linux): a port handed out by `bind(0)` there can be
/// taken again by any outgoing connection before its user binds it, while the
/// ports below are taken only by those who ask for them by number.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Each process starts somewhere else in the range, then walks it; bounded.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (offset + step) % SPAN;
        if let Ok(port) = u16::try_from(port)
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The split deployment's service groups as `scripts/cluster up --split` runs
/// them: `(name, target)`, such as `("catalog", "catalog,inventory,media")`.
pub fn split_groups() -> Vec<(String, String)> {
    let out = Command::new("bash")
        .args([
            "-c",
            ". \"$1\" && printf '%s\\n' \"${SPLIT_GROUPS[@]}\"",
            "bash",
        ])
        .arg(cluster_script())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "sourcing scripts/cluster: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, target)| (name.to_owned(), target.to_owned()))
        .collect()
}

impl Gateway {
    /// Renders the configuration for `plan` into `dir` and starts HAProxy on free
    /// ports, waiting (bounded) until it accepts connections. With `services_port`,
    /// it also listens there for calls between services (the only address that
    /// routes `/internal/...`).
    pub fn start(dir: &Path, plan: &[Instance], services_port: Option<u16>) -> Self {
        assert!(
            Command::new("haproxy").arg("-v").output().is_ok(),
            "haproxy is missing: scripts/test installs it (or apt-get install haproxy)"
        );
        std::fs::create_dir_all(dir).expect("gateway dir");
        let entries: Vec<String> = plan
            .iter()
            .map(|i| format!("{} {} {}", i.name, i.target, i.port))
            .collect();
        let cfg = dir.join("haproxy.cfg");
        let log = dir.join("haproxy.log");
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let (port, stats_port) = (free_port(), free_port());
            let rendered = Command::new("bash")
                .args([
                    "-c",
                    ". \"$1\" && shift && PLAN=(\"${@:5}\") && render_gateway \"$1\" \"$2\" \"$3\" \"$4\"",
                    "bash",
                ])
                .arg(cluster_script())
                .arg(port.to_string())
                .arg(stats_port.to_string())
                .arg(&cfg)
                .arg(services_port.map(|p| p.to_string()).unwrap_or_default())
                .args(&entries)
                .output()
                .expect("bash");
            assert!(
                rendered.status.success(),
                "render_gateway: {}",
                String::from_utf8_lossy(&rendered.stderr)
            );
            let mut child = Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log).expect("gateway log"))
                .stderr(
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(&log)
                        .expect("gateway log"),
                )
                .spawn()
                .expect("start haproxy");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!(
                        "haproxy exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                // Someone listens there; it is this haproxy only if it is still
                // running a moment later (one that could not bind the port,
                // taken since it was picked, exits at once).
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                    if let Ok(Some(status)) = child.try_wait() {
                        last_error = format!(
                            "haproxy exited ({status}): {}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                        break;
                    }
                    return Self {
                        child,
                        port,
                        stats_port,
                        log,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = "haproxy did not listen within 10 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("the gateway did not start: {last_error}");
    }

    /// The gateway's public address.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// HAProxy's statistics page (`;csv` for the machine-readable form).
    pub fn stats_url(&self) -> String {
        format!("http://127.0.0.1:{}/stats", self.stats_port)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
