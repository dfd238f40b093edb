//! A real `sync-gateway` process for the tests, killed on drop, and the clients that talk to
//! it: WebSocket sessions (tokio-tungstenite) and a minimal HTTP/1.1 client.

use crate::{free_port, Cluster};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The HS256 secret every test gateway uses.
pub const SECRET: &str = "test-secret";

/// How long a test waits for a message or a condition before failing.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A running gateway.
pub struct Gateway {
    child: Child,
    pub port: u16,
}

impl Gateway {
    /// Starts a gateway on `cluster` with the test secret and `extra` flags, and waits until
    /// it is ready (its first read of the log is done).
    pub async fn start(cluster: &Cluster, extra: &[&str]) -> Gateway {
        let port = free_port();
        let child = Command::new(binary())
            .arg("serve")
            .args(["--database-url", &cluster.url("postgres")])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--jwt-secret", SECRET])
            .args(extra)
            .env("RUST_LOG", "sync_gateway=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("sync-gateway starts (build it first: cargo build -p sync-gateway)");
        let gateway = Gateway { child, port };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok((200, _)) = gateway.get("/readyz").await {
                return gateway;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway not ready within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws/sync{query}", self.port)
    }

    /// Opens a WebSocket session for `sub`.
    pub async fn connect(&self, sub: &str) -> Session {
        self.connect_with(&token(sub, &[]), "")
            .await
            .expect("connects")
    }

    /// Opens a session with a token in the header and extra query parameters; Err carries
    /// the HTTP status of a refused upgrade.
    pub async fn connect_with(&self, token: &str, query: &str) -> Result<Session, u16> {
        use tungstenite::client::IntoClientRequest;
        let mut request = self.ws_url(query).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => Ok(Session { stream }),
            Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
            Err(e) => panic!("websocket: {e}"),
        }
    }

    /// GET `path`: the status and the body.
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http(
            self.port,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    /// Sends SIGTERM; true when the process then exits successfully within PATIENCE.
    pub async fn stop(mut self) -> bool {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        matches!(tokio::time::timeout(PATIENCE, self.child.wait()).await, Ok(Ok(status)) if status.success())
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

fn binary() -> PathBuf {
    // target/<profile>/deps/<test binary> → target/<profile>/sync-gateway
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("sync-gateway")
}

async fn http(port: u16, request: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A token signed with the test secret for `sub`, valid for an hour, with extra claims.
pub fn token(sub: &str, claims: &[(&str, Value)]) -> String {
    let mut body = json!({"sub": sub, "exp": now() + 3600});
    for (k, v) in claims {
        body[*k] = v.clone();
    }
    sign(&body, SECRET)
}

pub fn sign(claims: &Value, secret: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One client's WebSocket session.
pub struct Session {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Session {
    pub async fn send(&mut self, message: Value) {
        self.send_text(&message.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The next JSON message (pings are answered by the library), or None when the server
    /// closed the connection; panics after PATIENCE.
    pub async fn next(&mut self) -> Option<Value> {
        self.next_or_close().await.ok()
    }

    /// The next JSON message, or the close code when the connection ends.
    pub async fn next_or_close(&mut self) -> Result<Value, Option<u16>> {
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.stream.next())
                .await
                .expect("a message in time");
            match frame {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    /// The next message of type `kind`, skipping none: panics on any other.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let message = self
            .next()
            .await
            .unwrap_or_else(|| panic!("connection closed, expected {kind}"));
        assert_eq!(message["type"], kind, "expected {kind}, got {message}");
        message["payload"].clone()
    }

    /// Subscribes and waits for SUBSCRIBED.
    pub async fn subscribe(&mut self, payload: Value) -> Value {
        self.send(json!({"type": "SUBSCRIBE", "payload": payload}))
            .await;
        self.expect("SUBSCRIBED").await
    }

    /// Every message up to (not including) the change of row `id` of the `marker` entity,
    /// without other marker changes: because a connection's live messages follow the log's
    /// order, they hold all the changes committed before that marker row.
    pub async fn changes_until(&mut self, id: i32) -> Vec<Value> {
        let mut messages = Vec::new();
        loop {
            let message = self.next().await.expect("connection open");
            if message["payload"]["entityCode"] == "marker" && message["type"] != "SUBSCRIBED" {
                let ids = message["payload"]["changes"]
                    .as_array()
                    .into_iter()
                    .flatten();
                if ids
                    .filter_map(|c| c["entityId"].as_str())
                    .any(|m| m == id.to_string())
                {
                    return messages;
                }
                continue;
            }
            messages.push(message);
        }
    }

    /// Closes without a close frame, as a dropped network would.
    pub fn drop_connection(self) {
        drop(self.stream);
    }
}

/// The `(entityId, action)` pairs of change messages, in order.
pub fn actions(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter(|m| m["type"] == "DELTA" || m["type"] == "INVALIDATE")
        .flat_map(|m| m["payload"]["changes"].as_array().unwrap().clone())
        .map(|c| {
            (
                c["entityId"].as_str().unwrap().to_owned(),
                c["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}
