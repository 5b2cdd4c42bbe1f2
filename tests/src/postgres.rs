//! A real PostgreSQL 15 for the store tests: Debian's `postgresql-15` binaries
//! (`/usr/lib/postgresql/15/bin`, installed by `cargo xtask test`), run by the test itself in a
//! temporary directory on a free loopback port; never a system service. `initdb` and `postgres`
//! refuse to run as root, and CI runs as root: as root, they run as the system user
//! [`OS_USER`], created on first use.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs PostgreSQL 15's server binaries.
pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// The system user the server runs as when the tests run as root.
pub const OS_USER: &str = "kiln-pg";

/// The database role the tests connect as (trust authentication on loopback only).
const ROLE: &str = "kiln";

/// A `postgres` child process with its data directory, stopped (fast shutdown) when dropped.
pub struct PostgresServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// (uid, gid) the server runs as; None: as this process's user.
    run_as: Option<(u32, u32)>,
}

impl PostgresServer {
    /// initdb, start, wait until it accepts connections; None (a skip) when the binaries are
    /// missing outside CI, a panic under CI.
    pub fn start() -> Option<PostgresServer> {
        if !crate::have(
            Path::new(BIN).join("postgres").is_file(),
            "PostgreSQL 15 (/usr/lib/postgresql/15/bin)",
            "run `cargo xtask test` (it installs Debian's postgresql-15)",
        ) {
            return None;
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = (unsafe { libc::geteuid() } == 0).then(os_user);
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
        }
        let mut server = PostgresServer {
            child: None,
            port: crate::process::free_port(),
            dir,
            run_as,
        };
        let initdb = server
            .command("initdb")
            .arg("-D")
            .arg(server.data())
            .args([
                "-U",
                ROLE,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-locale",
            ])
            .output()
            .expect("running initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&initdb.stdout),
            String::from_utf8_lossy(&initdb.stderr)
        );
        server.resume();
        Some(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command of [`BIN`], run as the server's user.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(Path::new(BIN).join(name));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    /// `postgres://kiln@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the server (again, after [`Self::stop`]: an outage) and waits until it accepts.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("postgres.log")).expect("log");
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(
                self.dir.path().join("postgres.log"),
                Some(uid),
                Some(gid),
            );
        }
        // Durability off: a test's database is thrown away (the store's own settings are the
        // operator's; the benchmark states them).
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "synchronous_commit=off", "-c", "max_connections=200"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", ROLE])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections within 60 s: {}",
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it (SIGINT: PostgreSQL's fast shutdown) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
        }
    }

    /// Creates database `name` (one per test, so tests share a server).
    pub fn create_database(&self, name: &str) {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", ROLE])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "CREATE DATABASE {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl PostgresServer {
    /// Runs `sql` on `database` with psql; its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", ROLE])
            .args(["-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("UTF-8")
            .trim()
            .to_owned()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// (uid, gid) of [`OS_USER`], created (a system user, no home, no shell) if missing.
fn os_user() -> (u32, u32) {
    let lookup = || {
        let out = Command::new("id").args(["-u", OS_USER]).output().ok()?;
        let uid = String::from_utf8(out.stdout).ok()?.trim().parse().ok()?;
        let out = Command::new("id").args(["-g", OS_USER]).output().ok()?;
        let gid = String::from_utf8(out.stdout).ok()?.trim().parse().ok()?;
        Some((uid, gid))
    };
    if let Some(ids) = lookup() {
        return ids;
    }
    let created = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            OS_USER,
        ])
        .status()
        .expect("running useradd");
    // Another test process may have created it meanwhile: look again either way.
    lookup().unwrap_or_else(|| panic!("could not create the system user {OS_USER} ({created})"))
}
