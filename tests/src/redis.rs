//! A real Redis for the rate-limiter tests: Debian's `redis-server` (installed by `cargo xtask
//! test`), started by the test itself on a free loopback port in a temporary directory, with
//! nothing saved to disk; never a system service.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `cargo xtask test` installs it (xtask's `setup::REDIS_SERVER`).
const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// A `redis-server` child process, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one and waits until it answers `PING`; None (a skip) when `redis-server` is
    /// missing outside CI, a panic under CI.
    pub fn start() -> Option<RedisServer> {
        if !crate::have(
            Path::new(REDIS_SERVER).is_file(),
            REDIS_SERVER,
            "run `cargo xtask test` (it installs Debian's redis-server)",
        ) {
            return None;
        }
        let mut server = RedisServer {
            child: None,
            port: crate::process::free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        server.resume();
        Some(server)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (an outage); [`Self::resume`] starts it again on the same port, empty.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) and waits until it answers `PING`.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("redis log");
        let child = Command::new(REDIS_SERVER)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.pings() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 20 s: {}",
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
