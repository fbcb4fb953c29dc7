//! Measurements taken inside a lab with standard tools (ping, iperf3), shared by the tests
//! and the benchmarks.
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Lab, LabError};

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

/// Round-trip times in milliseconds of `count` pings from `from` to `to` (lost ones omitted).
pub fn ping_rtts(
    lab: &Lab,
    from: &str,
    to: &str,
    count: u32,
    interval: Duration,
) -> Result<Vec<f64>, LabError> {
    let target = lab.addr(to)?.to_string();
    let count_s = count.to_string();
    let interval_s = format!("{:.3}", interval.as_secs_f64());
    let deadline = Duration::from_secs(10) + interval * count * 2;
    let out = lab.exec_timeout(
        from,
        &["ping", "-n", "-c", &count_s, "-i", &interval_s, &target],
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

/// One iperf3 TCP run from `client` to `server` over the lab; returns received bits per second.
pub fn iperf3_tcp(
    lab: &Lab,
    server: &str,
    client: &str,
    secs: u32,
    streams: u32,
) -> Result<f64, LabError> {
    let mut srv = lab.spawn(
        server,
        "iperf3-server",
        &["iperf3", "-s", "-1", "--forceflush"],
    )?;
    let target = lab.addr(server)?.to_string();
    let (secs_s, streams_s) = (secs.to_string(), streams.to_string());
    let mut last = String::new();
    let mut result = None;
    // The server needs a moment to listen; a refused connection is retried, nothing else.
    lab.wait_until("iperf3 to connect", Duration::from_secs(10), || {
        match lab.exec_timeout(
            client,
            &[
                "iperf3", "-c", &target, "-t", &secs_s, "-P", &streams_s, "-f", "m",
            ],
            Duration::from_secs(u64::from(secs) + 20),
        ) {
            Ok(out) if out.status.success() => {
                result = parse_iperf3_receiver(&out.stdout);
                last = out.stdout;
                true
            }
            Ok(out) => {
                last = format!("{}{}", out.stdout, out.stderr);
                !last.contains("refused")
            }
            Err(e) => {
                last = e.to_string();
                true
            }
        }
    })?;
    let _ = srv.stop(Duration::from_secs(2));
    result.ok_or_else(|| {
        LabError::Lab(format!(
            "iperf3 from {client} to {server} gave no result: {last}"
        ))
    })
}

/// The receiver's total rate from iperf3's text summary, in bits per second.
fn parse_iperf3_receiver(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with("receiver"))?;
    let mut words = line.split_whitespace().collect::<Vec<_>>();
    let unit_at = words.iter().position(|w| w.ends_with("bits/sec"))?;
    let value: f64 = words.get(unit_at.checked_sub(1)?)?.parse().ok()?;
    let scale = match words.swap_remove(unit_at) {
        "Gbits/sec" => 1e9,
        "Mbits/sec" => 1e6,
        "Kbits/sec" => 1e3,
        "bits/sec" => 1.0,
        _ => return None,
    };
    Some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf3_summaries() {
        let single =
            "[  5]   0.00-3.00   sec  3.91 GBytes  11194 Mbits/sec                  receiver\n";
        assert_eq!(parse_iperf3_receiver(single), Some(11194e6));
        let multi = "[  5]   0.00-3.00   sec  1 GBytes  500 Mbits/sec  0  sender\n\
                     [SUM]   0.00-3.00   sec  2.5 GBytes  7.16 Gbits/sec                  receiver\n";
        assert_eq!(parse_iperf3_receiver(multi), Some(7.16e9));
        assert_eq!(parse_iperf3_receiver("garbage"), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
