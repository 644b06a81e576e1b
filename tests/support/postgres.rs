//! A private PostgreSQL server for a test: Debian's binaries
//! (`/usr/lib/postgresql/*/bin`, highest version), `initdb` into a temp dir, `postgres` started
//! directly as a child on a free loopback port (its socket in the temp dir), superuser and
//! database `citygate` with trust authentication, stopped by its pid (SIGINT: fast shutdown)
//! when dropped. As root (initdb refuses to run as root) the server runs as the `postgres`
//! system user through `setpriv`, which execs, so the child's pid is the server's.
//!
//! Missing binaries skip the test with a notice on stderr, unless
//! `CITYGATE_REQUIRE_POSTGRES=1` (CI sets it), which makes them a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The role and database the tests use.
pub const PG_USER: &str = "citygate";
pub const PG_DB: &str = "citygate";

/// A running (or stopped, between [`PgServer::stop`] and [`PgServer::start_again`]) server.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    starts: u32,
    /// `-c name=value` settings of every start.
    settings: Vec<String>,
}

/// The directory of the highest installed PostgreSQL version's binaries.
fn binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            ["initdb", "postgres"]
                .iter()
                .all(|b| bin.join(b).exists())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `program args…`, as the `postgres` user when running as root.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PgServer {
    /// Initialises and starts a server; `None` (after a notice) if PostgreSQL is not
    /// installed and `CITYGATE_REQUIRE_POSTGRES` is not set.
    pub async fn start() -> Option<PgServer> {
        PgServer::start_with_tls(None).await
    }

    /// [`PgServer::start`] with TLS on (`ssl = on`) from `(certificate, key)` PEM files, if
    /// given; clients may still connect without TLS.
    pub async fn start_with_tls(tls: Option<(&Path, &Path)>) -> Option<PgServer> {
        let Some(bin) = binaries() else {
            assert!(
                std::env::var("CITYGATE_REQUIRE_POSTGRES").is_err(),
                "CITYGATE_REQUIRE_POSTGRES is set but no /usr/lib/postgresql/*/bin/{{initdb,postgres}} is installed"
            );
            eprintln!("note: PostgreSQL not installed (apt-get install postgresql); test skipped");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown of the server's temp dir failed");
        }
        let out = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut settings = vec!["fsync=off".to_owned(), "full_page_writes=off".to_owned()];
        if let Some((cert, key)) = tls {
            let (c, k) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::copy(cert, &c).unwrap();
            std::fs::copy(key, &k).unwrap();
            std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if is_root() {
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .args([&c, &k])
                    .status()
                    .unwrap();
                assert!(status.success());
            }
            settings.push("ssl=on".to_owned());
            settings.push(format!("ssl_cert_file={}", c.display()));
            settings.push(format!("ssl_key_file={}", k.display()));
        }
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            child: None,
            starts: 0,
            settings,
        };
        server.start_on_free_port().await;
        server.psql_db("postgres", &format!("CREATE DATABASE {PG_DB}"));
        Some(server)
    }

    /// Picks a free port and starts; another process taking the port first means another try.
    async fn start_on_free_port(&mut self) {
        for _ in 0..5 {
            self.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if self.spawn().await {
                return;
            }
        }
        panic!("postgres found no free port in 5 attempts");
    }

    /// Starts the server on `self.port`; false if the port was taken.
    async fn spawn(&mut self) -> bool {
        self.starts += 1;
        let log_path = self
            .dir
            .path()
            .join(format!("postgres-{}.log", self.starts));
        let log = std::fs::File::create(&log_path).unwrap();
        if is_root() {
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&log_path)
                .status();
        }
        let mut child = as_server_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let mut exited = false;
        let settled = super::wait_for(Duration::from_secs(30), || {
            exited = child.try_wait().unwrap().is_some();
            exited || read().contains("ready to accept connections")
        })
        .await;
        assert!(
            settled,
            "postgres neither became ready nor exited: {}",
            read()
        );
        if exited {
            assert!(
                read().contains("already in use"),
                "postgres did not start: {}",
                read()
            );
            return false;
        }
        self.child = Some(child);
        true
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the test database (no password: trust authentication).
    pub fn url(&self) -> String {
        format!("postgresql://{PG_USER}@127.0.0.1:{}/{PG_DB}", self.port)
    }

    /// Stops the server (SIGINT: fast shutdown) and waits for it (bounded).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::signal(&child, "-INT");
            let status = super::wait_exit(&mut child, Duration::from_secs(30)).await;
            assert!(status.success(), "postgres stopped with {status}");
        }
    }

    /// Starts the stopped server again on the same port and data.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        assert!(self.spawn().await, "port {} was taken meanwhile", self.port);
    }

    /// Runs `sql` in the test database and returns the rows (on a thread of its own: the
    /// blocking client must not run on an async worker).
    pub fn query(&self, sql: &str) -> Vec<postgres::Row> {
        let url = self.url();
        let sql = sql.to_owned();
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            c.query(sql.as_str(), &[]).unwrap()
        })
        .join()
        .unwrap()
    }

    /// One `bigint` (e.g. `count(*)`).
    pub fn count(&self, sql: &str) -> i64 {
        self.query(sql)[0].get(0)
    }

    fn psql_db(&self, db: &str, sql: &str) {
        let url = format!("postgresql://{PG_USER}@127.0.0.1:{}/{db}", self.port);
        let sql = sql.to_owned();
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            c.batch_execute(&sql).unwrap();
        })
        .join()
        .unwrap();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}
