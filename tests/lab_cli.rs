//! `meshd lab …` as a person uses it: up, exec, down, Ctrl-C, clean, and refusal without root.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshd_netlab::registry;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

fn small_topology() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshd-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small.toml");
    std::fs::write(
        &path,
        "[[host]]\nname = \"coord\"\n\n[[site]]\nname = \"edge\"\nnat = \"endpoint-independent\"\nlatency_ms = 4\nnodes = [\"edge1\"]\n",
    )
    .unwrap();
    path
}

/// A `meshd lab up` in the background, with its output in a file.
struct UpProcess {
    child: Child,
    out: PathBuf,
    id: String,
}

impl UpProcess {
    fn start(file: &Path) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let out = std::env::temp_dir().join(format!("meshd-lab-up-{}-{n}.out", std::process::id()));
        let child = Command::new(MESHD)
            .args(["lab", "up"])
            .arg(file)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Owned at once, so that a failed wait below still kills and reaps it.
        let mut up = UpProcess {
            child,
            out,
            id: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&up.out).unwrap_or_default();
            let id = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("lab "))
                .and_then(|l| l.split(' ').next());
            if let (Some(id), true) = (id, text.contains("stop:")) {
                up.id = id.to_owned();
                return up;
            }
            assert!(
                Instant::now() < deadline,
                "meshd lab up did not come up: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn namespaces(&self) -> usize {
        registry::namespaces().get(&self.id).map_or(0, Vec::len)
    }

    fn wait_exit(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "meshd lab up did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
        if let Some(lab) = registry::list().into_iter().find(|l| l.id == self.id) {
            let _ = registry::remove(&lab.id, &lab.namespaces);
        }
    }
}

fn meshd(args: &[&str]) -> std::process::Output {
    Command::new(MESHD).args(args).output().unwrap()
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

#[test]
fn lab_up_exec_and_down() {
    let mut up = UpProcess::start(&small_topology());
    assert_eq!(up.namespaces(), 4, "inet, coord, edge router, edge1");

    let out = meshd(&[
        "lab", "exec", "--lab", &up.id, "edge1", "--", "ip", "-4", "-o", "addr", "show", "dev",
        "eth0",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("198.19."),
        "{out:?}"
    );
    // The exit code of the command comes back.
    let out = meshd(&[
        "lab", "exec", "--lab", &up.id, "coord", "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    let out = meshd(&["lab", "exec", "--lab", &up.id, "nosuch", "--", "true"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("edge1"),
        "{out:?}"
    );

    let out = meshd(&["lab", "down", &up.id]);
    assert!(out.status.success(), "{out:?}");
    up.wait_exit();
    assert_eq!(up.namespaces(), 0);
}

#[test]
fn ctrl_c_removes_the_lab() {
    let mut up = UpProcess::start(&small_topology());
    assert_eq!(up.namespaces(), 4);
    signal(&up.child, rustix::process::Signal::INT);
    up.wait_exit();
    assert_eq!(up.namespaces(), 0, "Ctrl-C left namespaces behind");
}

#[test]
fn clean_removes_labs_left_by_a_killed_process_and_only_those() {
    let file = small_topology();
    let mut crashed = UpProcess::start(&file);
    let running = UpProcess::start(&file);
    signal(&crashed.child, rustix::process::Signal::KILL);
    crashed.wait_exit();
    assert_eq!(
        crashed.namespaces(),
        4,
        "SIGKILL cannot clean up: the namespaces must still be there"
    );

    let out = meshd(&["lab", "clean"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&crashed.id),
        "{out:?}"
    );
    assert_eq!(
        crashed.namespaces(),
        0,
        "clean did not remove the crashed lab"
    );
    assert_eq!(running.namespaces(), 4, "clean touched a running lab");
}

#[test]
fn a_bad_topology_file_is_refused_with_the_reason() {
    let dir = small_topology().with_file_name("bad.toml");
    std::fs::write(
        &dir,
        "[[site]]\nname = \"s\"\nnodes = [\"n\"]\nnat = \"full-cone\"\n",
    )
    .unwrap();
    let out = meshd(&["lab", "up", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("full-cone") && err.contains("bad.toml"),
        "{err}"
    );
    let out = meshd(&["lab", "up", "/nonexistent/lab.toml"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn without_root_the_lab_refuses_at_once_and_says_why() {
    let started = Instant::now();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            MESHD,
            "lab",
            "up",
            "examples/federation.toml",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unprivileged lab up must fail: {err}"
    );
    assert!(
        err.contains("root") && err.contains("CAP_NET_ADMIN"),
        "message must say root is needed: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "must fail at once"
    );
}

/// The README's main job: the demo federation with a whole mesh on it.
#[test]
fn the_demo_runs_a_mesh_and_every_pair_takes_its_expected_path() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/federation.toml");
    let out = meshd(&["lab", "demo", file]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("every pair reached each other by the expected path"),
        "{stdout}"
    );
    // The matrix: one row per node, relayed cells for the UDP-blocked corp1.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("corp1 ") && l.contains(" ms"))
        .unwrap_or("");
    assert_eq!(row.matches(" r ").count(), 4, "{stdout}");
    assert!(stdout.contains("lab removed"), "{stdout}");
}
