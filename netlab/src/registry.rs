//! Which labs exist on this machine and who owns them, so that a lab left behind by a crashed
//! process can be found and removed — and a running one left alone.
//!
//! Every lab's namespaces are named `ml<id>-<name>` (id: 5 characters of [a-z0-9]); its owner
//! is recorded in `/run/meshd-lab/<id>/owner` as "pid start-time".
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{sys, LabError};

pub const STATE_DIR: &str = "/run/meshd-lab";
const NETNS_DIR: &str = "/run/netns";
pub const ID_LEN: usize = 5;

/// The namespace name of `name` in lab `id`.
pub fn ns_name(id: &str, name: &str) -> String {
    format!("ml{id}-{name}")
}

/// Splits a namespace name into (lab id, name) if it is one of ours.
pub fn parse_ns_name(ns: &str) -> Option<(&str, &str)> {
    let rest = ns.strip_prefix("ml")?;
    let (id, name) = rest.split_at_checked(ID_LEN)?;
    let name = name.strip_prefix('-')?;
    let id_ok = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (id_ok && !name.is_empty()).then_some((id, name))
}

/// Reserves a fresh lab id by creating its state directory, and records this process as owner.
pub fn create() -> Result<(String, PathBuf), LabError> {
    std::fs::create_dir_all(STATE_DIR).map_err(|source| LabError::Io {
        what: format!("creating {STATE_DIR}"),
        source,
    })?;
    let pid = std::process::id();
    let start = sys::process_start_time(pid).unwrap_or(0);
    for _ in 0..100 {
        let id: String = (0..ID_LEN)
            .map(|_| {
                let c = rand::random_range(0..36u8);
                char::from(if c < 10 { b'0' + c } else { b'a' + c - 10 })
            })
            .collect();
        let dir = Path::new(STATE_DIR).join(&id);
        let taken = namespaces().keys().any(|k| k == &id);
        if taken || std::fs::create_dir(&dir).is_err() {
            continue;
        }
        std::fs::write(dir.join("owner"), format!("{pid} {start}\n")).map_err(|source| {
            LabError::Io {
                what: format!("writing {}", dir.display()),
                source,
            }
        })?;
        return Ok((id, dir));
    }
    Err(LabError::Lab(format!(
        "could not reserve a lab id under {STATE_DIR}"
    )))
}

/// All lab namespaces on the machine, by lab id.
pub fn namespaces() -> BTreeMap<String, Vec<String>> {
    let mut labs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return labs;
    };
    for e in entries.flatten() {
        let ns = e.file_name().to_string_lossy().into_owned();
        if let Some((id, _)) = parse_ns_name(&ns) {
            labs.entry(id.to_owned()).or_default().push(ns.clone());
        }
    }
    for list in labs.values_mut() {
        list.sort();
    }
    labs
}

/// What is known of one lab on this machine.
#[derive(Debug, Clone)]
pub struct LabInfo {
    pub id: String,
    pub owner_pid: Option<u32>,
    /// The owner process still runs (so the lab is in use, not left behind).
    pub alive: bool,
    pub namespaces: Vec<String>,
}

/// Every lab that has namespaces or a state directory.
pub fn list() -> Vec<LabInfo> {
    let mut ns = namespaces();
    if let Ok(entries) = std::fs::read_dir(STATE_DIR) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if id.len() == ID_LEN {
                ns.entry(id).or_default();
            }
        }
    }
    ns.into_iter()
        .map(|(id, namespaces)| {
            let owner = std::fs::read_to_string(Path::new(STATE_DIR).join(&id).join("owner")).ok();
            let mut parts = owner.as_deref().unwrap_or("").split_whitespace();
            let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
            let start = parts.next().and_then(|s| s.parse::<u64>().ok());
            let alive = match (pid, start) {
                (Some(p), Some(s)) => sys::process_start_time(p) == Some(s),
                _ => false,
            };
            LabInfo {
                id,
                owner_pid: pid,
                alive,
                namespaces,
            }
        })
        .collect()
}

/// Kills every process inside the namespaces, deletes them and the lab's state directory.
pub fn remove(id: &str, namespaces: &[String]) -> Result<(), LabError> {
    let mut errors = Vec::new();
    for ns in namespaces {
        if let Ok(pids) = sys::run("ip", &["netns", "pids", ns], None) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
    if !namespaces.is_empty() {
        let batch: String = namespaces
            .iter()
            .map(|ns| format!("netns del {ns}\n"))
            .collect();
        // -force: go on past a namespace that is already gone.
        if let Err(e) = sys::run("ip", &["-force", "-batch", "-"], Some(&batch)) {
            errors.push(e.to_string());
        }
    }
    // wireguard-go and boringtun-cli keep their control sockets in one directory shared by all
    // namespaces; the lab's tunnels are named wg<id>…, so these are ours.
    if let Ok(entries) = std::fs::read_dir(crate::peers::UAPI_DIR) {
        let prefix = format!("wg{id}");
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let dir = Path::new(STATE_DIR).join(id);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Lab(format!(
            "lab {id} was not removed cleanly: {}",
            errors.join("; ")
        )))
    }
}

/// Removes every lab whose owner process is gone; returns the ids removed. Running labs stay.
pub fn clean() -> Result<Vec<String>, LabError> {
    let mut removed = Vec::new();
    for lab in list().into_iter().filter(|l| !l.alive) {
        remove(&lab.id, &lab.namespaces)?;
        removed.push(lab.id);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_round_trip_and_foreign_ones_are_ignored() {
        assert_eq!(
            parse_ns_name(&ns_name("ab1c9", "edge1")),
            Some(("ab1c9", "edge1"))
        );
        for foreign in [
            "t1",
            "mlab1c9",
            "mlAB1C9-x",
            "ml-ab1c9-x",
            "mlab1c9-",
            "mlab1-x",
            "docker",
        ] {
            assert_eq!(parse_ns_name(foreign), None, "{foreign}");
        }
    }
}
