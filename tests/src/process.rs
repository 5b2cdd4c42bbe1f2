//! A real `kiln serve` process for the tests that need one (kill -9, SIGTERM), and `kiln admin`
//! to prepare its database.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `kiln admin --config <config> --database-url <db> <args>`; its stdout, or a panic that quotes
/// the output. (`--config` after the subcommand: `kiln --config <file> admin ...` is refused by
/// clap, "the subcommand 'admin' cannot be used with `--config <CONFIG>`".)
pub fn kiln_admin(bin: &Path, config: &Path, db: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("admin")
        .arg("--config")
        .arg(config)
        .args(["--database-url", db])
        .args(args)
        .output()
        .expect("running kiln admin");
    assert!(
        out.status.success(),
        "kiln admin {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A free loopback port (bound, read and released: a small race, acceptable in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A `kiln serve` child process, SIGKILLed when dropped (a failing test leaves no server).
pub struct KilnProcess {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl KilnProcess {
    pub fn spawn(bin: &Path, config: &Path, models: &Path, db: &str, log: PathBuf) -> KilnProcess {
        let port = free_port();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("server log file");
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--models-dir")
            .arg(models)
            .args(["--addr", &format!("127.0.0.1:{port}"), "--database-url", db])
            // Loaded before the port opens: the load clients start at once.
            .args(["--warm-all", "true"])
            .arg("--ort-dylib")
            .arg(crate::ort_dylib())
            .arg("--cache-dir")
            .arg(crate::repo_root().join(".kiln/cache"))
            .env("KILN_LOG", "warn")
            .stdin(Stdio::null())
            // A file, not a pipe: a full pipe nobody reads would stall the server.
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("spawning kiln serve");
        KilnProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until `/health` answers (loading compiles nothing new: the plugin cache is warm).
    pub async fn wait_healthy(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("kiln serve exited ({status}):\n{}", self.log_tail());
            }
            let health = client
                .get(format!("{}/health", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve did not answer /health within 180 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for KilnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
