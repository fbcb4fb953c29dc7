//! The node's connection to its home relay (`meshd_relay::client`), as NAT
//! traversal uses it: WireGuard datagrams the relay delivers go straight to
//! the engine from the connection's reader, disco packets to the traversal
//! task.

use meshd_dataplane::engine::{self as dp, EngineHandle};
use meshd_dataplane::keys::{PrivateKey, PublicKey};
use meshd_proto::{disco, NodeKey, RelayEntry};
use meshd_relay::client::{ClientOptions, Event, RelayClient, RelaySender, TransportChoice};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::paths::RelayId;

/// How often the relay is pinged, and how long an answer may take before
/// the relay counts as gone.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);

/// What the relay delivered that is not for the engine: disco packets.
pub type Delivered = mpsc::UnboundedSender<(RelayId, NodeKey, Vec<u8>)>;

/// Where a connection's deliveries go, and how they are labelled.
pub struct Receivers {
    pub id: RelayId,
    pub generation: u64,
    /// WireGuard datagrams.
    pub engine: EngineHandle,
    pub delivered: Delivered,
    /// Told `generation` when the connection ends.
    pub lost: mpsc::UnboundedSender<u64>,
}

/// A live connection: dropping it closes the connection.
#[derive(Debug)]
pub struct Link {
    pub sender: RelaySender,
    /// `QUIC` or `TLS/TCP`.
    pub transport: String,
    _close: oneshot::Sender<()>,
}

/// Connects to `entry` as `key` (QUIC, and TLS over TCP alongside after a
/// head start: the first to be accepted is used). The connection lives until
/// the relay ends it, which `lost` is told with `generation`, or the [`Link`]
/// is dropped.
pub async fn connect(
    entry: &RelayEntry,
    key: &PrivateKey,
    transport: Option<TransportChoice>,
    to: Receivers,
) -> Result<Link, String> {
    let Receivers {
        id,
        generation,
        engine,
        delivered,
        lost,
    } = to;
    let addr = entry
        .info
        .addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(entry.info.addrs.first())
        .ok_or_else(|| format!("relay {} has no address", entry.name))?;
    let mut opts = ClientOptions::new(addr.to_string(), entry.info.cert_pin);
    opts.relay_key = Some(x25519_dalek::PublicKey::from(entry.key.0));
    if let Some(t) = transport {
        opts.transport = t;
    }
    let mut client = RelayClient::connect(&opts, &key.to_static_secret())
        .await
        .map_err(|e| e.to_string())?;
    let sender = client.sender();
    let transport = client.transport().to_string();
    let (close, mut closed) = oneshot::channel::<()>();
    // A relay whose host died sends nothing: a ping every second that gets
    // no answer within two says so, long before any transport would.
    let (dead, mut is_dead) = oneshot::channel::<()>();
    let pinger = client.sender();
    let liveness = tokio::spawn(async move {
        loop {
            tokio::time::sleep(LIVENESS_INTERVAL).await;
            if tokio::time::timeout(LIVENESS_TIMEOUT, pinger.ping())
                .await
                .is_err()
            {
                let _ = dead.send(());
                return;
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                e = client.recv() => e,
                _ = &mut closed => break,
                _ = &mut is_dead => {
                    tracing::warn!("the relay stopped answering pings");
                    let _ = lost.send(generation);
                    break;
                }
            };
            match event {
                Ok(Event::Packet { src, datagram }) => {
                    if disco::is_disco(&datagram) {
                        let from = NodeKey(src.to_bytes());
                        if delivered.send((id, from, datagram.to_vec())).is_err() {
                            break;
                        }
                    } else {
                        let peer = PublicKey::from_bytes(src.to_bytes());
                        if engine
                            .relayed(dp::RelayId(id.0), peer, datagram.to_vec())
                            .is_err()
                        {
                            break;
                        }
                    }
                }
                Ok(Event::PeerGone { key, reason }) => {
                    tracing::debug!(peer = %NodeKey(key.to_bytes()), ?reason, "relay cannot deliver to peer");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay connection ended");
                    let _ = lost.send(generation);
                    break;
                }
            }
        }
        liveness.abort();
        client.close().await;
    });
    Ok(Link {
        sender,
        transport,
        _close: close,
    })
}
