//! A TCP proxy in front of a RabbitMQ node that can cut a connection at an exact point of the AMQP conversation:
//! when the client sends a given method (e.g. the worker's `basic.ack`, or its reply's `basic.publish`), that frame
//! is dropped and the connection is closed on both sides, as if the network failed right then. For faults that a
//! node stop or kill can only hit by chance: "the reply was confirmed, the ack never reached the broker".
//!
//! Only what the client sends is parsed (AMQP 0-9-1 frames: type, channel, size, payload, 0xCE); what the broker
//! sends is copied as it comes. A cut is one-shot: armed with [`AmqpProxy::cut_on`], it fires on the first matching
//! frame of any connection, and later connections (the client's reconnection) are forwarded untouched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// An AMQP method, by class and method id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    pub class: u16,
    pub method: u16,
}

impl Method {
    /// `basic.publish` (60, 40).
    pub const BASIC_PUBLISH: Self = Self { class: 60, method: 40 };
    /// `basic.ack` (60, 80).
    pub const BASIC_ACK: Self = Self { class: 60, method: 80 };
}

const FRAME_METHOD: u8 = 1;
const FRAME_END: u8 = 0xCE;
const PROTOCOL_HEADER_LEN: usize = 8;

#[derive(Debug, Default)]
struct State {
    armed: Mutex<Option<Method>>,
    cuts: AtomicU64,
    connections: AtomicU64,
}

impl State {
    /// Whether `method` is the armed one (disarming it).
    fn fire(&self, method: Method) -> bool {
        let mut armed = self.armed.lock().unwrap();
        if *armed == Some(method) {
            *armed = None;
            self.cuts.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        false
    }
}

/// The proxy, listening on a free loopback port; stops when dropped.
pub struct AmqpProxy {
    pub port: u16,
    state: Arc<State>,
    server: JoinSet<()>,
}

impl AmqpProxy {
    /// Listens on loopback and forwards every connection to `upstream` (a RabbitMQ AMQP listener).
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State::default());
        let mut server = JoinSet::new();
        let accept_state = state.clone();
        server.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                accept_state.connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(forward(client, upstream, accept_state.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { port, state, server })
    }

    /// `uri` (an `amqp://user:pass@host:port/vhost` URI of the upstream) with the proxy's address instead.
    pub fn uri(&self, user_pass: &str, vhost: &str) -> String {
        format!("amqp://{user_pass}@127.0.0.1:{}/{vhost}", self.port)
    }

    /// The next `method` any client sends is dropped and its connection cut.
    pub fn cut_on(&self, method: Method) {
        *self.state.armed.lock().unwrap() = Some(method);
    }

    /// Whether a cut is armed and has not fired yet.
    pub fn armed(&self) -> bool {
        self.state.armed.lock().unwrap().is_some()
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }
}

impl Drop for AmqpProxy {
    fn drop(&mut self) {
        self.server.abort_all();
    }
}

/// Forwards one connection until either side closes it or a cut fires.
async fn forward(client: TcpStream, upstream: SocketAddr, state: Arc<State>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let to_server = async {
        let mut buffer = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut header_sent = false;
        loop {
            let n = match client_read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buffer.extend_from_slice(&chunk[..n]);
            if !header_sent {
                if buffer.len() < PROTOCOL_HEADER_LEN {
                    continue;
                }
                let header: Vec<u8> = buffer.drain(..PROTOCOL_HEADER_LEN).collect();
                if server_write.write_all(&header).await.is_err() {
                    return;
                }
                header_sent = true;
            }
            // Forward every complete frame, unless it is the one to cut at.
            while let Some(len) = frame_len(&buffer) {
                if let Some(method) = method_of(&buffer[..len])
                    && state.fire(method)
                {
                    // Dropped with the connection: the broker never sees it.
                    return;
                }
                if server_write.write_all(&buffer[..len]).await.is_err() {
                    return;
                }
                buffer.drain(..len);
            }
        }
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    };
    // Whichever direction ends first ends the connection: both sockets are dropped (closed) on return.
    tokio::select! {
        () = to_server => {}
        () = to_client => {}
    }
}

/// The length of the first frame in `buffer`, once it is complete.
fn frame_len(buffer: &[u8]) -> Option<usize> {
    if buffer.len() < 7 {
        return None;
    }
    let size = u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]) as usize;
    let len = 7 + size + 1;
    (buffer.len() >= len).then_some(len)
}

/// The method a complete method frame carries.
fn method_of(frame: &[u8]) -> Option<Method> {
    if frame[0] != FRAME_METHOD || frame.len() < 12 || frame[frame.len() - 1] != FRAME_END {
        return None;
    }
    Some(Method { class: u16::from_be_bytes([frame[7], frame[8]]), method: u16::from_be_bytes([frame[9], frame[10]]) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_method_frame() {
        // basic.ack on channel 1: delivery tag 7, multiple false.
        let mut frame = vec![1, 0, 1, 0, 0, 0, 13, 0, 60, 0, 80];
        frame.extend_from_slice(&7u64.to_be_bytes());
        frame.push(0);
        frame.push(FRAME_END);
        assert_eq!(frame_len(&frame), Some(frame.len()));
        assert_eq!(frame_len(&frame[..frame.len() - 1]), None);
        assert_eq!(method_of(&frame), Some(Method::BASIC_ACK));
        let heartbeat = [8, 0, 0, 0, 0, 0, 0, FRAME_END];
        assert_eq!(frame_len(&heartbeat), Some(8));
        assert_eq!(method_of(&heartbeat), None);
    }
}
