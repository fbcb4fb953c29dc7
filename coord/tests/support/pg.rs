//! A private PostgreSQL server for tests: initdb in a temporary directory,
//! listening on a loopback port, run as the `postgres` user when the tests run
//! as root (the server refuses to run as root). Stopped and removed on drop.
//! A missing server is a test failure, not a skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// The OS user the server runs as, when it is not the current one.
    run_as: Option<String>,
}

fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: install the Debian \
             package `postgresql` (scripts/install-deps does)"
        ),
    }
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("run id");
    assert!(out.status.success(), "id {args:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

impl TestPostgres {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server that asks user `meshd` for `password` (SCRAM) on TCP.
    pub fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("meshd-pg")
            .tempdir()
            .expect("tempdir");
        let run_as = (id(&["-u"]) == 0).then(|| "postgres".to_owned());
        if run_as.is_some() {
            let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown test dir");
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = TestPostgres {
            dir,
            bin,
            port,
            run_as,
        };
        let data = pg.data();
        let mut args = vec!["-D", &data, "-U", "meshd", "-E", "UTF8", "--no-sync"];
        let pwfile = pg.dir.path().join("pwfile").display().to_string();
        match password {
            None => args.extend(["-A", "trust"]),
            Some(p) => {
                std::fs::write(&pwfile, p).expect("write the password file");
                if let Some(user) = &pg.run_as {
                    let (uid, gid) = (id(&["-u", user]), id(&["-g", user]));
                    std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown");
                }
                args.extend(["--auth-local", "trust", "--auth-host", "scram-sha-256"]);
                args.push("--pwfile");
                args.push(&pwfile);
            }
        }
        pg.run("initdb", &args);
        pg.start_server();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let tool = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&tool);
                c
            }
            None => Command::new(&tool),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run PostgreSQL tool");
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}{}",
            tool.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    pub fn stop_server(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for the default database (without a password).
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=meshd dbname=postgres",
            self.port
        )
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Best effort: the server may already be stopped.
        let data = self.data();
        let tool = self.bin.join("pg_ctl");
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&tool);
                c
            }
            None => Command::new(&tool),
        };
        let _ = cmd
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
