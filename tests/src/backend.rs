//! A user's HTTP handler container, stand-in: a tiny HTTP/1.1 server on loopback that the worker's HTTP handler
//! forwards to, which can be started late, stopped and restarted on the same port, and counts how often it ran
//! each request (by the `id` field of the params).
//!
//! Methods (`POST /rpc/<method>`):
//! - `slow`: sleeps `{"ms": N}` then answers like `echo`;
//! - `hang`: never answers;
//! - `big`: answers a JSON string of `{"bytes": N}` bytes;
//! - anything else (`echo` included): answers the params.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// What the backend saw, kept across stops and restarts.
#[derive(Debug, Default)]
pub struct BackendLog {
    runs: Mutex<HashMap<String, u32>>,
    requests: Mutex<u64>,
}

impl BackendLog {
    /// How many times each `id` ran.
    pub fn runs(&self) -> HashMap<String, u32> {
        self.runs.lock().unwrap().clone()
    }

    pub fn runs_of(&self, id: &str) -> u32 {
        self.runs.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// Requests received, with or without an id.
    pub fn requests(&self) -> u64 {
        *self.requests.lock().unwrap()
    }

    fn record(&self, params: &Value) {
        *self.requests.lock().unwrap() += 1;
        if let Some(id) = params.get("id") {
            let id = id.as_str().map(str::to_owned).unwrap_or_else(|| id.to_string());
            *self.runs.lock().unwrap().entry(id).or_default() += 1;
        }
    }
}

/// The backend's address, reserved before it listens so a worker can be pointed at it first.
pub struct Backend {
    pub addr: SocketAddr,
    pub log: Arc<BackendLog>,
    server: Option<JoinSet<()>>,
}

impl Backend {
    /// An address for a backend that is not listening yet.
    pub fn reserve() -> Self {
        let port = crate::operator_process::free_port();
        Self { addr: SocketAddr::from(([127, 0, 0, 1], port)), log: Arc::default(), server: None }
    }

    /// A backend listening now.
    pub async fn start_now() -> Self {
        let mut backend = Self::reserve();
        backend.start().await;
        backend
    }

    /// The URL to give the worker's `--handler`.
    pub fn url(&self) -> String {
        format!("http://{}/rpc", self.addr)
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Starts listening on the reserved address (retrying briefly while the port is still held by a closed socket).
    pub async fn start(&mut self) {
        assert!(self.server.is_none(), "the backend already runs");
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) if tries < 50 => {
                    tries += 1;
                    eprintln!("backend: binding {} failed ({error}), retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("backend: cannot bind {}: {error}", self.addr),
            }
        };
        let log = self.log.clone();
        let mut server = JoinSet::new();
        server.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve(stream, log.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        self.server = Some(server);
    }

    /// Stops listening and drops every open connection (requests in progress get a reset or EOF).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.abort_all();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(mut stream: TcpStream, log: Arc<BackendLog>) {
    let Some((path, params)) = read_request(&mut stream).await else { return };
    log.record(&params);
    let method = path.rsplit('/').next().unwrap_or_default();
    let body = match method {
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        "slow" => {
            let ms = params.get("ms").and_then(Value::as_u64).unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            params.to_string().into_bytes()
        }
        "big" => {
            let bytes = params.get("bytes").and_then(Value::as_u64).unwrap_or(1024) as usize;
            let mut body = Vec::with_capacity(bytes);
            body.push(b'"');
            body.resize(bytes.saturating_sub(1).max(1), b'x');
            body.push(b'"');
            body
        }
        _ => params.to_string().into_bytes(),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(head.as_bytes()).await.is_ok() && stream.write_all(&body).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// The path and the JSON body of one HTTP/1.1 request.
async fn read_request(stream: &mut TcpStream) -> Option<(String, Value)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buffer.len() > 1 << 20 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.lines();
    let path = lines.next()?.split_whitespace().nth(1)?.to_owned();
    let length: usize = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((path, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}
