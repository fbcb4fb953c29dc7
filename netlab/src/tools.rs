//! Measurements taken inside a lab with standard tools (ping, iperf3), shared by the tests
//! and the benchmarks.
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Lab, LabError, Proc};

/// The port of every iperf3 server the lab starts.
const IPERF3_PORT: u16 = 5201;

/// A UDP server that answers every datagram with the source address it saw, as text
/// ("198.18.3.2:40000"): the mapped address a NAT gave the sender. Runs on a thread of the
/// calling process, with its socket in a lab node's namespace.
pub struct UdpReflector {
    addr: SocketAddr,
    _server: Background,
}

impl UdpReflector {
    /// Listens on `port` of `node`'s address.
    pub fn start(lab: &Lab, node: &str, port: u16) -> Result<Self, LabError> {
        let addr = SocketAddr::from((lab.addr(node)?, port));
        Self::start_at(lab, node, addr)
    }

    pub fn start_at(lab: &Lab, node: &str, addr: SocketAddr) -> Result<Self, LabError> {
        let sock = lab
            .in_ns(node, || UdpSocket::bind(addr))?
            .map_err(|source| LabError::Io {
                what: format!("binding {addr} in {node}"),
                source,
            })?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|source| LabError::Io {
                what: "setting a socket timeout".into(),
                source,
            })?;
        let mut buf = [0u8; 2048];
        let server = Background::spawn(move || {
            if let Ok((_, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(from.to_string().as_bytes(), from);
            }
        });
        Ok(UdpReflector {
            addr,
            _server: server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A UDP socket in `node`'s namespace, bound to `port` (0: any) on all addresses.
pub fn udp_socket(lab: &Lab, node: &str, port: u16) -> Result<UdpSocket, LabError> {
    let sock = lab
        .in_ns(node, || UdpSocket::bind(("0.0.0.0", port)))?
        .map_err(|source| LabError::Io {
            what: format!("binding UDP port {port} in {node}"),
            source,
        })?;
    Ok(sock)
}

/// Sends one datagram to `to` and waits up to `timeout` for any answer: None if nothing came.
pub fn udp_ask(sock: &UdpSocket, to: SocketAddr, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).ok()?;
    sock.send_to(b"?", to).ok()?;
    let mut buf = [0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Whether `sock` receives any datagram within `timeout`.
pub fn udp_receives(sock: &UdpSocket, timeout: Duration) -> bool {
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(timeout)).is_ok() && sock.recv_from(&mut buf).is_ok()
}

/// A TCP server in a node that accepts and closes connections, on a thread of this process.
pub struct TcpAcceptor {
    _server: Background,
}

impl TcpAcceptor {
    pub fn start(lab: &Lab, node: &str, port: u16) -> Result<Self, LabError> {
        let addr = SocketAddr::from((lab.addr(node)?, port));
        let listener = lab
            .in_ns(node, || TcpListener::bind(addr))?
            .map_err(|source| LabError::Io {
                what: format!("listening on {addr} in {node}"),
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| LabError::Io {
                what: "making a listener non-blocking".into(),
                source,
            })?;
        let server = Background::spawn(move || {
            if listener.accept().is_err() {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Ok(TcpAcceptor { _server: server })
    }
}

/// A thread that runs `step` over and over until dropped. Each step must return within a
/// short time (a socket timeout or a brief sleep), since the stop flag is read between steps.
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    fn spawn(mut step: impl FnMut() + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                step();
            }
        });
        Background {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a TCP connection from `node` to `to` is established within `timeout`.
pub fn tcp_connects(
    lab: &Lab,
    node: &str,
    to: SocketAddr,
    timeout: Duration,
) -> Result<bool, LabError> {
    lab.in_ns(node, || TcpStream::connect_timeout(&to, timeout).is_ok())
}

/// Round-trip times in milliseconds of `count` pings from `from` to the node `to`.
pub fn ping_rtts(
    lab: &Lab,
    from: &str,
    to: &str,
    count: u32,
    interval: Duration,
) -> Result<Vec<f64>, LabError> {
    ping_addr(lab, from, lab.addr(to)?, count, interval)
}

/// Round-trip times (ms) of `count` pings from `from` to `target` (lost ones omitted).
pub fn ping_addr(
    lab: &Lab,
    from: &str,
    target: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<Vec<f64>, LabError> {
    let (count_s, target_s) = (count.to_string(), target.to_string());
    let interval_s = format!("{:.3}", interval.as_secs_f64());
    let deadline = Duration::from_secs(10) + interval * count * 2;
    let out = lab.exec_timeout(
        from,
        &["ping", "-n", "-c", &count_s, "-i", &interval_s, &target_s],
        deadline,
    )?;
    // A non-zero exit only means some replies were lost; the parsed count tells.
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect())
}

/// The median of `count` pings, or an error if fewer than 90 % came back.
pub fn median_rtt(
    lab: &Lab,
    from: &str,
    target: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<f64, LabError> {
    let rtts = ping_addr(lab, from, target, count, interval)?;
    if (rtts.len() as u32) * 10 < count * 9 {
        return Err(LabError::Lab(format!(
            "only {} of {count} pings from {from} to {target} came back",
            rtts.len()
        )));
    }
    median(&rtts).ok_or_else(|| LabError::Lab(format!("no ping from {from} to {target} came back")))
}

/// One iperf3 TCP test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iperf3Test {
    pub secs: u32,
    pub streams: u32,
    /// The server sends (iperf3 -R).
    pub reverse: bool,
}

/// What the receiving side of an iperf3 test counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iperf3Result {
    pub bits_per_second: f64,
    pub bytes: u64,
}

/// A persistent `iperf3 -s` in a lab node, for several tests in a row; stopped on drop.
pub struct Iperf3Server<'lab> {
    lab: &'lab Lab,
    node: String,
    proc: Proc,
}

impl<'lab> Iperf3Server<'lab> {
    /// Starts it and waits until it listens.
    pub fn start(lab: &'lab Lab, node: &str) -> Result<Self, LabError> {
        let port = IPERF3_PORT.to_string();
        let proc = lab.spawn(node, "iperf3-server", &["iperf3", "-s", "-p", &port])?;
        let mut server = Iperf3Server {
            lab,
            node: node.to_owned(),
            proc,
        };
        let filter = format!("sport = :{port}");
        let mut died = None;
        lab.wait_until(
            &format!("iperf3 to listen in {node}"),
            Duration::from_secs(10),
            || {
                if let Some(s) = server.proc.try_wait() {
                    died = Some(s);
                    return true;
                }
                lab.exec(node, &["ss", "-Hltn", &filter])
                    .is_ok_and(|o| !o.stdout.trim().is_empty())
            },
        )?;
        if let Some(s) = died {
            return Err(LabError::Lab(format!(
                "iperf3 -s in {node} exited ({s}): {}",
                tail(&server.proc.log(), 1000)
            )));
        }
        Ok(server)
    }

    /// Runs one test from `client` to `target` (an address of the server's node).
    pub fn run(
        &self,
        client: &str,
        target: Ipv4Addr,
        test: Iperf3Test,
    ) -> Result<Iperf3Result, LabError> {
        let (target_s, secs, streams) = (
            target.to_string(),
            test.secs.to_string(),
            test.streams.to_string(),
        );
        let port = IPERF3_PORT.to_string();
        let mut argv = vec![
            "iperf3", "-c", &target_s, "-p", &port, "-t", &secs, "-P", &streams, "-J",
        ];
        if test.reverse {
            argv.push("-R");
        }
        let out = self.lab.exec_timeout(
            client,
            &argv,
            Duration::from_secs(u64::from(test.secs) + 30),
        )?;
        parse_iperf3_json(&out.stdout).map_err(|why| {
            LabError::Lab(format!(
                "iperf3 from {client} to {target} (server in {}): {why}; stderr: {}",
                self.node,
                tail(&out.stderr, 500)
            ))
        })
    }
}

/// The receiver's totals from `iperf3 -J`, or what iperf3 said went wrong.
fn parse_iperf3_json(text: &str) -> Result<Iperf3Result, String> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("output is not iperf3 JSON ({e}): {}", tail(text, 300)))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(err.to_owned());
    }
    let sum = &v["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_u64()) {
        (Some(bits_per_second), Some(bytes)) => Ok(Iperf3Result {
            bits_per_second,
            bytes,
        }),
        _ => Err(format!(
            "no end.sum_received in its JSON: {}",
            tail(text, 300)
        )),
    }
}

/// The last `max` bytes of a text (at a character boundary), for error messages.
pub(crate) fn tail(text: &str, max: usize) -> &str {
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// The median of a non-empty slice.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// One iperf3 TCP run from `client` to the node `server`; returns received bits per second.
pub fn iperf3_tcp(
    lab: &Lab,
    server: &str,
    client: &str,
    secs: u32,
    streams: u32,
) -> Result<f64, LabError> {
    let srv = Iperf3Server::start(lab, server)?;
    let test = Iperf3Test {
        secs,
        streams,
        reverse: false,
    };
    Ok(srv.run(client, lab.addr(server)?, test)?.bits_per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn reads_iperf3_json_and_its_errors() {
        let ok = r#"{"start":{},"end":{"sum_sent":{"bytes":10,"bits_per_second":1.0},
                    "sum_received":{"bytes":2867658699,"bits_per_second":22940535494.86}}}"#;
        assert_eq!(
            parse_iperf3_json(ok),
            Ok(Iperf3Result {
                bits_per_second: 22940535494.86,
                bytes: 2867658699
            })
        );
        let failed =
            r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#;
        assert_eq!(
            parse_iperf3_json(failed),
            Err("unable to connect to server: Connection refused".into())
        );
        assert!(parse_iperf3_json("iperf3: error").is_err());
        assert!(parse_iperf3_json(r#"{"end":{}}"#).is_err());
    }
}
