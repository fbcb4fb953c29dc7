//! Whether a meshd binary has its per-packet code linked together: the functions
//! in `link/hot-symbols.txt` (see the root `build.rs`) found in the binary's
//! symbol table, and how far apart they lie. The data-plane benchmark reports it,
//! because a list gone stale (new dependencies, compiler or data path) silently
//! costs each daemon microseconds per packet.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use crate::{sys, LabError};

/// The list the root `build.rs` gives the linker.
const HOT_SYMBOLS: &str = include_str!("../../link/hot-symbols.txt");

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Functions on the list.
    pub listed: usize,
    /// Of them, functions the binary has.
    pub found: usize,
    /// Their total size, and the bytes from the first one's start to the last one's end.
    pub size: u64,
    pub span: u64,
}

impl Layout {
    /// All listed functions are there, side by side (with room for alignment padding).
    pub fn in_effect(&self) -> bool {
        self.listed > 0
            && self.found == self.listed
            && self.span <= self.size + self.size / 4 + 4096
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kib = |b: u64| b as f64 / 1024.0;
        write!(
            f,
            "{} of {} hot-path functions found, {:.0} KiB of code within {:.0} KiB",
            self.found,
            self.listed,
            kib(self.size),
            kib(self.span)
        )?;
        if !self.in_effect() {
            f.write_str(
                " — not linked together: regenerate link/hot-symbols.txt with scripts/hot-symbols",
            )?;
        }
        Ok(())
    }
}

/// Reads `binary`'s symbol table with `nm`.
pub fn check(binary: &Path) -> Result<Layout, LabError> {
    sys::require_tool("nm", "binutils")?;
    let path = binary.display().to_string();
    let symbols = sys::run("nm", &["--defined-only", "--print-size", &path], None)?;
    Ok(assess(HOT_SYMBOLS, &symbols))
}

/// `list`: one symbol per line, `#` comments; `nm`: lines `ADDRESS SIZE TYPE NAME`.
fn assess(list: &str, nm: &str) -> Layout {
    let wanted: BTreeSet<&str> = list
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    let mut found = BTreeSet::new();
    let (mut size, mut start, mut end) = (0, u64::MAX, 0);
    for line in nm.lines() {
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(len), Some(_kind), Some(name)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(addr), Ok(len)) = (u64::from_str_radix(addr, 16), u64::from_str_radix(len, 16))
        else {
            continue;
        };
        if wanted.contains(name) && found.insert(name) {
            size += len;
            start = start.min(addr);
            end = end.max(addr + len);
        }
    }
    Layout {
        listed: wanted.len(),
        found: found.len(),
        size,
        span: end.saturating_sub(start),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "# comment\nhot_a\nhot_b\n\nhot_c # trailing\n";

    #[test]
    fn side_by_side_functions_are_in_effect() {
        let nm = "0000000000001000 0000000000000100 t hot_a\n\
                  0000000000001100 0000000000000080 T hot_b\n\
                  0000000000001180 0000000000000040 t hot_c\n\
                  0000000000900000 0000000000000010 T cold\n";
        let layout = assess(LIST, nm);
        assert_eq!(
            layout,
            Layout {
                listed: 3,
                found: 3,
                size: 0x1c0,
                span: 0x1c0
            }
        );
        assert!(layout.in_effect(), "{layout}");
    }

    #[test]
    fn scattered_or_missing_functions_are_not() {
        let scattered = "0000000000001000 0000000000000100 t hot_a\n\
                         0000000000001100 0000000000000080 T hot_b\n\
                         0000000000400000 0000000000000040 t hot_c\n";
        assert!(!assess(LIST, scattered).in_effect());
        let missing = "0000000000001000 0000000000000100 t hot_a\n\
                       garbage line\n\
                       zz 0000000000000080 T hot_b\n";
        let layout = assess(LIST, missing);
        assert_eq!((layout.listed, layout.found), (3, 1));
        assert!(!layout.in_effect());
        assert!(layout.to_string().contains("regenerate"), "{layout}");
        assert!(!assess("", missing).in_effect());
    }
}
