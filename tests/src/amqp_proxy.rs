//! A TCP proxy in front of a RabbitMQ node that can cut a connection at an exact point of the AMQP conversation:
//! when the client sends a given method (e.g. the worker's `basic.ack`, or its reply's `basic.publish`), that frame
//! is dropped and the connection is closed on both sides, as if the network failed right then. For faults that a
//! node stop or kill can only hit by chance: "the reply was confirmed, the ack never reached the broker".
//!
//! It can also hold back what the broker sends, without cutting anything: when the broker sends a given method
//! (e.g. the `basic.ack` confirming a reply), that frame and every later frame of the same channel reach the client
//! a set time later, in order, while the connection's other channels and channel 0 (heartbeats, `connection.blocked`)
//! pass at once: a broker slow to answer on one channel (a quorum queue electing a leader), not a dead connection.
//!
//! Both directions are parsed as AMQP 0-9-1 frames (type, channel, size, payload, 0xCE). Each fault is one-shot:
//! armed with [`AmqpProxy::cut_on`] or [`AmqpProxy::delay_on`], it fires on the first matching frame of any
//! connection, and later frames and connections (the client's reconnection) are forwarded untouched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

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
    /// A method the broker sends, and how long to hold its channel from there.
    delay: Mutex<Option<(Method, Duration)>>,
    delays: AtomicU64,
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

    /// How long to hold the channel of a `method` the broker sends, when it is the armed one (disarming it).
    fn fire_delay(&self, method: Method) -> Option<Duration> {
        let mut delay = self.delay.lock().unwrap();
        match *delay {
            Some((armed, hold)) if armed == method => {
                *delay = None;
                self.delays.fetch_add(1, Ordering::SeqCst);
                Some(hold)
            }
            _ => None,
        }
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

    /// The next `method` the broker sends to any client, and every later frame of the same channel, reach the
    /// client `hold` later (in order); the connection's other channels and its heartbeats are not held.
    pub fn delay_on(&self, method: Method, hold: Duration) {
        *self.state.delay.lock().unwrap() = Some((method, hold));
    }

    /// Holds started so far.
    pub fn delays(&self) -> u64 {
        self.state.delays.load(Ordering::SeqCst)
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
        let mut buffer = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        // The channel being held, until when, and its frames meanwhile.
        let mut held: Option<(u16, Instant, Vec<u8>)> = None;
        loop {
            let release = held.as_ref().map(|(_, until, _)| *until);
            tokio::select! {
                read = server_read.read(&mut chunk) => {
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buffer.extend_from_slice(&chunk[..n]);
                    let mut pass = Vec::new();
                    while let Some(len) = frame_len(&buffer) {
                        let frame: Vec<u8> = buffer.drain(..len).collect();
                        let channel = u16::from_be_bytes([frame[1], frame[2]]);
                        if held.is_none()
                            && let Some(method) = method_of(&frame)
                            && let Some(hold) = state.fire_delay(method)
                        {
                            held = Some((channel, Instant::now() + hold, Vec::new()));
                        }
                        match &mut held {
                            Some((on, _, frames)) if *on == channel => frames.extend_from_slice(&frame),
                            _ => pass.extend_from_slice(&frame),
                        }
                    }
                    if !pass.is_empty() && client_write.write_all(&pass).await.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(release.unwrap_or_else(Instant::now)), if release.is_some() => {
                    let Some((_, _, frames)) = held.take() else { continue };
                    if client_write.write_all(&frames).await.is_err() {
                        return;
                    }
                }
            }
        }
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

    fn basic_ack(channel: u16, tag: u64) -> Vec<u8> {
        let mut frame = vec![FRAME_METHOD];
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&13u32.to_be_bytes());
        frame.extend_from_slice(&[0, 60, 0, 80]);
        frame.extend_from_slice(&tag.to_be_bytes());
        frame.extend_from_slice(&[0, FRAME_END]);
        frame
    }

    #[tokio::test]
    async fn a_delay_holds_one_channel_and_lets_heartbeats_through() {
        let upstream = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let proxy = AmqpProxy::start(upstream.local_addr().unwrap()).await.unwrap();
        let hold = Duration::from_millis(500);
        proxy.delay_on(Method::BASIC_ACK, hold);
        let mut client = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        client.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let (mut broker, _) = upstream.accept().await.unwrap();
        let mut header = [0u8; PROTOCOL_HEADER_LEN];
        broker.read_exact(&mut header).await.unwrap();
        let heartbeat = [8, 0, 0, 0, 0, 0, 0, FRAME_END];
        let start = Instant::now();
        // The confirm of tag 1 on channel 1, a heartbeat, then tag 2 on channel 1: the heartbeat overtakes both.
        let mut sent = basic_ack(1, 1);
        sent.extend_from_slice(&heartbeat);
        sent.extend_from_slice(&basic_ack(1, 2));
        broker.write_all(&sent).await.unwrap();
        let mut first = [0u8; 8];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(first, heartbeat);
        assert!(start.elapsed() < hold, "the heartbeat was held");
        let mut rest = vec![0u8; 2 * basic_ack(1, 1).len()];
        client.read_exact(&mut rest).await.unwrap();
        assert!(start.elapsed() >= hold, "the channel was not held");
        assert_eq!(rest, [basic_ack(1, 1), basic_ack(1, 2)].concat());
        assert_eq!(proxy.delays(), 1);
        // One-shot: what follows passes at once.
        let again = Instant::now();
        broker.write_all(&basic_ack(1, 3)).await.unwrap();
        let mut third = vec![0u8; basic_ack(1, 3).len()];
        client.read_exact(&mut third).await.unwrap();
        assert_eq!(third, basic_ack(1, 3));
        assert!(again.elapsed() < hold);
    }
}
