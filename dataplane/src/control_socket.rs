//! The local control socket both daemons serve: `meshd wg`'s WireGuard UAPI
//! socket and `meshd up`'s `control.sock`. One server, two protocols: both
//! exchange text messages of lines that end at an empty line, and the
//! server hands each request to the daemon's handler and writes back its
//! reply, without knowing what either says.
//!
//! A connection may carry several requests in turn (as WireGuard's UAPI
//! allows); each connection has its own thread, and a client that sends
//! nothing for [`IO_TIMEOUT`] is dropped.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use zeroize::Zeroizing;

/// The largest message either side reads: a set of ~10 000 peers.
pub const MAX_MESSAGE: usize = 4 << 20;

/// How long either side waits for the other in the middle of a message.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// How often the server looks at its stop flag, also while a connection
/// is idle, so that a client that keeps its connection open does not hold up
/// the daemon's exit.
const STOP_CHECK_DURATION: Duration = Duration::from_millis(100);
const STOP_CHECK: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// Removes the socket file when the daemon ends, also on error paths.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Why [`claim`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("a daemon already answers on {}", .0.display())]
    Running(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Binds a control socket at `path`, mode 0600, removed again when the
/// returned [`SocketFile`] drops. A socket that nothing answers on is left
/// over from a daemon that was killed, and replaced.
pub fn claim(path: &Path) -> Result<(UnixListener, SocketFile), ClaimError> {
    let io_err = |what: String| move |source| ClaimError::Io { what, source };
    match UnixStream::connect(path) {
        Ok(_) => return Err(ClaimError::Running(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale control socket");
            std::fs::remove_file(path)
                .map_err(io_err(format!("removing stale {}", path.display())))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("checking {}", path.display()))(e)),
    }
    let listener = match UnixListener::bind(path) {
        // Another daemon bound it after our check.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            return Err(ClaimError::Running(path.to_owned()))
        }
        other => other.map_err(io_err(format!("binding {}", path.display())))?,
    };
    let file = SocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod 600 {}", path.display())))?;
    Ok((listener, file))
}

/// Connects to the control socket at `path`; `None` when no daemon listens
/// there (no socket, or one left by a daemon that was killed).
pub fn connect(path: &Path) -> io::Result<Option<UnixStream>> {
    match UnixStream::connect(path) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sends one request on a connected socket and reads its reply, up to its
/// empty line.
pub fn exchange(stream: &mut UnixStream, request: &str) -> io::Result<Zeroizing<String>> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut reader = MessageReader::default();
    match reader.next(stream, None)? {
        Some(text) => Ok(text),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without a reply",
        )),
    }
}

/// The offset just past the empty line that ends the first message in
/// `buf`, if it holds a whole one.
pub fn message_end(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\n") {
        return Some(1);
    }
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

/// Reads the messages of one connection in turn. What is read past a
/// message's end is kept for the next; key material may pass through, so
/// buffers are zeroed when dropped.
#[derive(Default)]
struct MessageReader {
    buf: Zeroizing<Vec<u8>>,
}

impl MessageReader {
    /// The next whole message, `None` at the end of the stream (a partial
    /// message there counts as whole: a client may close instead of sending
    /// the empty line) or once `stop` is set. With `stop`, the stream's read
    /// timeout must be [`STOP_CHECK`]: the reader gives up after
    /// [`IO_TIMEOUT`] without a byte.
    fn next(
        &mut self,
        stream: &mut UnixStream,
        stop: Option<&AtomicBool>,
    ) -> io::Result<Option<Zeroizing<String>>> {
        let mut chunk = Zeroizing::new([0u8; 4096]);
        let mut idle = Duration::ZERO;
        // Where to look for the end: only what arrived since the last look
        // (and the byte before it), so a long message costs linear time.
        let mut scanned = 0;
        let end = loop {
            let found = if scanned == 0 {
                message_end(&self.buf)
            } else {
                self.buf[scanned..]
                    .windows(2)
                    .position(|w| w == b"\n\n")
                    .map(|i| scanned + i + 2)
            };
            if let Some(end) = found {
                break end;
            }
            scanned = self.buf.len().saturating_sub(1);
            if self.buf.len() > MAX_MESSAGE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("control message longer than {MAX_MESSAGE} bytes"),
                ));
            }
            match stream.read(&mut chunk[..]) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => break self.buf.len(),
                Ok(n) => {
                    idle = Duration::ZERO;
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e)
                    if stop.is_some()
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                {
                    if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                        return Ok(None);
                    }
                    idle += STOP_CHECK_DURATION;
                    if idle >= IO_TIMEOUT {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let rest = self.buf[end..].to_vec();
        self.buf.truncate(end);
        let message = std::mem::replace(&mut *self.buf, rest);
        String::from_utf8(message)
            .map(|s| Some(Zeroizing::new(s)))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "control message is not UTF-8"))
    }
}

/// What the server read: a request, or why it could not read one (a
/// message too long or not UTF-8). After a malformed message the
/// connection is closed once its answer is written, since where the next
/// message would start is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Text(&'a str),
    Malformed(&'a str),
}

/// What a daemon's handler makes of one request.
pub struct Answer {
    /// Written back as it is.
    pub reply: Zeroizing<String>,
    /// Close the connection after the reply (the daemon is stopping).
    pub close: bool,
}

impl Answer {
    pub fn reply(reply: impl Into<String>) -> Self {
        Answer {
            reply: Zeroizing::new(reply.into()),
            close: false,
        }
    }
}

/// Serves `listener` until `stop` is set: every request read from a
/// connection goes to `handler`, whose answer is written back.
pub fn serve<H>(listener: &UnixListener, stop: &AtomicBool, handler: &H)
where
    H: Fn(Request<'_>) -> Answer + Sync,
{
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(error = %e, "control socket unusable");
        return;
    }
    let open = AtomicUsize::new(0);
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(listener, PollFlags::IN)];
            if let Err(e) = rustix::event::poll(&mut fds, Some(&STOP_CHECK)) {
                if e != rustix::io::Errno::INTR {
                    tracing::error!(error = %e, "control socket poll");
                    return;
                }
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept");
                    continue;
                }
            };
            if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                tracing::debug!("control socket busy: connection closed");
                continue;
            }
            open.fetch_add(1, Ordering::Relaxed);
            let open = &open;
            let spawned = std::thread::Builder::new()
                .name("meshd-ctl".into())
                .spawn_scoped(s, move || {
                    if let Err(e) = serve_connection(stream, stop, handler) {
                        tracing::debug!(error = %e, "control connection");
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            if let Err(e) = spawned {
                open.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "control connection not served");
            }
        }
    });
}

fn serve_connection<H>(mut stream: UnixStream, stop: &AtomicBool, handler: &H) -> io::Result<()>
where
    H: Fn(Request<'_>) -> Answer + Sync,
{
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STOP_CHECK_DURATION))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = MessageReader::default();
    while !stop.load(Ordering::Relaxed) {
        let request = match reader.next(&mut stream, Some(stop)) {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let reason = e.to_string();
                let answer = handler(Request::Malformed(&reason));
                stream.write_all(answer.reply.as_bytes())?;
                // Closing with unread input would reset the connection and
                // lose the answer: end our side, then read what is still
                // coming for a moment.
                stream.shutdown(std::net::Shutdown::Write)?;
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                let mut sink = [0u8; 4096];
                while std::time::Instant::now() < deadline {
                    match stream.read(&mut sink) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                || e.kind() == io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let answer = handler(Request::Text(&request));
        stream.write_all(answer.reply.as_bytes())?;
        if answer.close {
            break;
        }
    }
    Ok(())
}

/// One `key=value` line of a message, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    pub line: usize,
    pub key: &'a str,
    pub value: &'a str,
}

/// A line that is not `key=value` with a key of the allowed bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control message, line {line}: {message}")]
pub struct FieldError {
    pub line: usize,
    pub message: String,
}

/// Splits a message (with or without its final empty line) into its
/// `key=value` lines; `first_line` is the number of the first. `key_byte`
/// says which bytes a key may hold; a bad key is quoted in the error up to
/// `quote_chars` characters.
pub fn fields(
    text: &str,
    first_line: usize,
    key_byte: fn(u8) -> bool,
    quote_chars: usize,
) -> Result<Vec<Field<'_>>, FieldError> {
    let body = text
        .strip_suffix("\n\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split('\n')
        .enumerate()
        .map(|(i, text)| {
            let line = first_line + i;
            let Some((key, value)) = text.split_once('=') else {
                return Err(FieldError {
                    line,
                    message: format!("expected key=value, got {:?}", shorten(text, quote_chars)),
                });
            };
            if key.is_empty() || !key.bytes().all(key_byte) {
                return Err(FieldError {
                    line,
                    message: format!("bad key {:?}", shorten(key, quote_chars)),
                });
            }
            Ok(Field { line, key, value })
        })
        .collect()
}

/// The first `max` characters of `s`, with "…" when it is longer. Quoted
/// text in errors is cut short, so a message never echoes a long value
/// (which might be a key) back.
pub fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lower(b: u8) -> bool {
        b.is_ascii_lowercase() || b == b'_'
    }

    #[test]
    fn message_ends_at_the_first_empty_line() {
        assert_eq!(message_end(b"get=1\n"), None);
        assert_eq!(message_end(b"get=1\n\nmore"), Some(7));
        assert_eq!(message_end(b"\n"), Some(1));
        assert_eq!(message_end(b""), None);
    }

    #[test]
    fn fields_name_their_lines() {
        let f = fields("a=1\nb_c=x=y\n\n", 2, lower, 8).unwrap();
        assert_eq!(
            f,
            vec![
                Field {
                    line: 2,
                    key: "a",
                    value: "1"
                },
                Field {
                    line: 3,
                    key: "b_c",
                    value: "x=y"
                }
            ]
        );
        assert!(fields("", 1, lower, 8).unwrap().is_empty());
        let e = fields("a=1\nnoequals\n", 1, lower, 8).unwrap_err();
        assert_eq!(e.line, 2);
        let e = fields("A=1\n", 1, lower, 8).unwrap_err();
        assert!(e.message.contains("bad key \"A\""), "{e}");
        let e = fields("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", 1, lower, 8).unwrap_err();
        assert!(e.message.contains("aaaaaaaa…"), "{e}");
    }

    #[test]
    fn a_connection_carries_requests_in_turn_and_bad_ones_do_not_stop_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sock");
        let (listener, file) = claim(&path).unwrap();
        assert!(matches!(claim(&path), Err(ClaimError::Running(_))));
        let stop = AtomicBool::new(false);
        // Stops the server also when an assertion fails, or the scope
        // would wait for it for ever.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let handler = |req: Request<'_>| match req {
            Request::Text(t) => Answer::reply(format!("echo={}\n\n", t.trim_end().len())),
            Request::Malformed(why) => Answer::reply(format!("bad={why}\n\n")),
        };
        std::thread::scope(|s| {
            s.spawn(|| serve(&listener, &stop, &handler));
            let _stop = StopOnDrop(&stop);
            let mut c = connect(&path).unwrap().unwrap();
            assert_eq!(&*exchange(&mut c, "get=1\n\n").unwrap(), "echo=5\n\n");
            assert_eq!(&*exchange(&mut c, "ab\n\n").unwrap(), "echo=2\n\n");
            // Not UTF-8, or too long: answered, then the connection is
            // closed; the server goes on.
            let mut bad = connect(&path).unwrap().unwrap();
            bad.write_all(b"\xff\xfe\n\n").unwrap();
            let mut rest = String::new();
            bad.read_to_string(&mut rest).unwrap();
            assert_eq!(rest, "bad=control message is not UTF-8\n\n");
            let mut long = connect(&path).unwrap().unwrap();
            let chunk = vec![b'a'; 1 << 16];
            let mut sent = 0;
            while sent <= MAX_MESSAGE {
                if long.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            let mut rest = String::new();
            long.read_to_string(&mut rest).unwrap();
            assert!(
                rest.starts_with("bad=control message longer than"),
                "{rest}"
            );
            // A client that closes without the empty line is answered.
            let mut c = connect(&path).unwrap().unwrap();
            c.write_all(b"x=1\n").unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, "echo=3\n\n");
            stop.store(true, Ordering::Relaxed);
        });
        drop(file);
        assert!(connect(&path).unwrap().is_none());
    }
}
