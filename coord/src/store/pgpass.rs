//! The passwords libpq finds outside the connection string, so that none has
//! to be on the command line (where `ps` shows it): `PGPASSWORD`, then the
//! password file, `PGPASSFILE` or `~/.pgpass` (one `host:port:database:user:
//! password` a line, `*` matching anything, `\` escaping `:` and `\`, `#`
//! starting a comment; ignored unless only its owner can read it).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// What a connection is for, as the password file's fields name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target<'a> {
    /// A host name or address; a Unix socket counts as `localhost`, as in libpq.
    pub host: &'a str,
    pub port: u16,
    pub dbname: &'a str,
    pub user: &'a str,
}

/// The password for `target` from the environment or the password file.
pub(crate) fn find(target: &Target<'_>) -> Option<String> {
    if let Ok(p) = std::env::var("PGPASSWORD") {
        return Some(p);
    }
    let path = match std::env::var_os("PGPASSFILE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".pgpass"),
    };
    let meta = std::fs::metadata(&path).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "the PostgreSQL password file is readable by others than its owner, so it is \
             ignored (as libpq does); chmod 600 it"
        );
        return None;
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => lookup(&text, target),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the PostgreSQL password file");
            None
        }
    }
}

/// The password of the first line of a password file that matches `target`.
pub(crate) fn lookup(text: &str, target: &Target<'_>) -> Option<String> {
    let port = target.port.to_string();
    let wanted = [target.host, &port, target.dbname, target.user];
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (fields, password) = split(line)?;
            fields
                .iter()
                .zip(wanted)
                .all(|(f, w)| f == "*" || f == w)
                .then_some(password)
        })
}

/// A line's four matching fields and its password, unescaped; `None` for a
/// line with fewer fields.
fn split(line: &str) -> Option<([String; 4], String)> {
    let mut fields: [String; 4] = Default::default();
    let mut i = 0;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields[i].push(next);
                }
            }
            ':' => {
                i += 1;
                if i == 4 {
                    let password = unescape(chars.as_str());
                    return Some((fields, password));
                }
            }
            c => fields[i].push(c),
        }
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const T: Target<'static> = Target {
        host: "db.example.net",
        port: 5432,
        dbname: "mesh",
        user: "meshd",
    };

    #[test]
    fn the_first_matching_line_wins_and_stars_match_anything() {
        let file = "# comment\n\
                    other:5432:mesh:meshd:wrong-host\n\
                    db.example.net:5433:mesh:meshd:wrong-port\n\
                    db.example.net:5432:*:meshd:right\n\
                    *:*:*:*:fallback\n";
        assert_eq!(lookup(file, &T).as_deref(), Some("right"));
        let other = Target {
            user: "someone",
            ..T
        };
        assert_eq!(lookup(file, &other).as_deref(), Some("fallback"));
        assert_eq!(lookup("short:line\n", &T), None);
        assert_eq!(lookup("", &T), None);
    }

    #[test]
    fn backslashes_escape_colons_and_themselves() {
        let file = "db.example.net:5432:mesh:meshd:pa\\:ss\\\\word:with:colons\n";
        assert_eq!(lookup(file, &T).as_deref(), Some("pa:ss\\word:with:colons"));
        let escaped_user = "*:*:*:me\\:shd:x\n";
        let t = Target {
            user: "me:shd",
            ..T
        };
        assert_eq!(lookup(escaped_user, &t).as_deref(), Some("x"));
    }
}
