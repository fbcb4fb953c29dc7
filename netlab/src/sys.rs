//! Small system helpers: privilege check, running commands, entering a namespace.
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::LabError;

/// CAP_NET_ADMIN (12) creates links and rules; CAP_SYS_ADMIN (21) creates and enters namespaces.
const NEEDED_CAPS: [(u32, &str); 2] = [(12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN")];

/// Fails at once, with a message that says why, unless this process may build a lab.
pub fn check_privileges() -> Result<(), LabError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| LabError::Io {
        what: "reading /proc/self/status".into(),
        source,
    })?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| cap_eff & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LabError::NotRoot {
            missing: missing.join(" and "),
        })
    }
}

/// Fails with an install hint when a command-line tool the lab drives is missing.
pub fn require_tool(tool: &str, package: &str) -> Result<(), LabError> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(LabError::MissingTool {
            tool: tool.into(),
            package: package.into(),
        })
    }
}

/// Runs a command to completion, feeding `stdin`; a non-zero exit is an error carrying stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
    let describe = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Io {
            what: format!("starting `{}`", describe()),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| LabError::Io {
                what: format!("writing to `{}`", describe()),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| LabError::Io {
        what: format!("waiting for `{}`", describe()),
        source,
    })?;
    if !out.status.success() {
        let input = stdin
            .map(|s| format!("\ninput was:\n{s}"))
            .unwrap_or_default();
        return Err(LabError::Command {
            command: describe(),
            status: out.status.to_string(),
            stderr: format!("{}{input}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread (only it) into the named network namespace.
pub fn enter_netns(ns: &str) -> Result<(), LabError> {
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).map_err(|source| LabError::Io {
        what: format!("opening {}", path.display()),
        source,
    })?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| LabError::Io {
        what: format!("entering network namespace {ns}"),
        source: e.into(),
    })
}

/// Runs `f` on a fresh thread inside the namespace; sockets it creates stay in that namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes a sysctl of the namespace (under /proc/sys, which follows the writer's namespace)
/// and reads it back: a key that is global, not per namespace, may refuse or ignore the write.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), LabError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let now = in_netns(ns, || {
        std::fs::write(&path, value)?;
        std::fs::read_to_string(&path)
    })?
    .map_err(|source| LabError::Io {
        what: format!("setting {key}={value} in {ns}"),
        source,
    })?;
    if now.trim() == value {
        Ok(())
    } else {
        Err(LabError::Lab(format!(
            "set {key}={value} in {ns}, but it reads {:?}",
            now.trim()
        )))
    }
}

/// Start time of a process in clock ticks since boot; with the pid it names a process uniquely.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields are counted
    // from the last ')'. starttime is field 22, the 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
