//! A real `sync-gateway` process for the tests, killed on drop, and the clients that talk to
//! it: WebSocket sessions (tokio-tungstenite) and HTTP requests (reqwest).

use crate::{free_port, Cluster, APP_ROLE, AUTHENTICATOR_ROLE, GATEWAY_ROLE};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncBufReadExt;
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
    /// The listener of `/metrics` and `/v1/status`.
    pub admin_port: u16,
    /// What it was started with, to start it again.
    args: Vec<String>,
}

impl Gateway {
    /// Starts a gateway on `cluster` with the test secret and `extra` flags, and waits until
    /// it is ready (its first read of the log is done). It logs in as the non-superuser
    /// [`GATEWAY_ROLE`], runs users' queries on [`AUTHENTICATOR_ROLE`] and acts as
    /// [`APP_ROLE`] for tokens without a role, unless `extra` says otherwise
    /// (`--default-role`, or `--database-url` to log in as someone else).
    pub async fn start(cluster: &Cluster, extra: &[&str]) -> Gateway {
        let mut args: Vec<String> = Vec::new();
        if !extra.contains(&"--database-url") {
            args.extend([
                "--database-url".into(),
                cluster.url_as(GATEWAY_ROLE, "postgres"),
                "--authenticator-url".into(),
                cluster.url_as(AUTHENTICATOR_ROLE, "postgres"),
            ]);
        }
        if !extra.contains(&"--default-role") {
            args.extend(["--default-role".into(), APP_ROLE.into()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        match Self::launch(&args).await {
            Ok(gateway) => gateway,
            Err(why) => panic!("the gateway did not start: {why}"),
        }
    }

    /// Starts a gateway with the test secret, its listeners and `args` alone, and waits until
    /// it is ready; Err with what it printed when it exits first (refuses to start).
    pub async fn launch(args: &[String]) -> Result<Gateway, String> {
        Self::launch_on(free_port(), free_port(), args).await
    }

    /// Kills this gateway (SIGKILL) and starts another with the same flags on the same
    /// ports, as an operator restarting a crashed one would.
    pub async fn replace(mut self) -> Gateway {
        let _ = self.child.kill().await;
        match Self::launch_on(self.port, self.admin_port, &self.args).await {
            Ok(gateway) => gateway,
            Err(why) => panic!("the gateway did not start again: {why}"),
        }
    }

    /// Stops this gateway with SIGTERM (its clients are told when to reconnect), runs
    /// `meanwhile` while no gateway runs, then starts another with the same flags on the same
    /// ports, as a rolling restart would.
    pub async fn restart(self, meanwhile: impl std::future::Future<Output = ()>) -> Gateway {
        let (port, admin_port, args) = (self.port, self.admin_port, self.args.clone());
        let stopping = std::time::Instant::now();
        assert!(self.stop().await, "the gateway did not stop cleanly");
        eprintln!("the gateway stopped in {:?}", stopping.elapsed());
        meanwhile.await;
        match Self::launch_on(port, admin_port, &args).await {
            Ok(gateway) => gateway,
            Err(why) => panic!("the gateway did not start again: {why}"),
        }
    }

    async fn launch_on(port: u16, admin_port: u16, args: &[String]) -> Result<Gateway, String> {
        let mut child = Command::new(binary())
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--jwt-secret", SECRET])
            .args(args)
            .env("RUST_LOG", "sync_gateway=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("sync-gateway starts (build it first: cargo build -p sync-gateway)");
        // Its log goes on to the test's output; the start of it is kept to explain a refusal.
        let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let keep = printed.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{line}");
                let mut kept = keep.lock().unwrap();
                if kept.len() < 64 * 1024 {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
        });
        let mut gateway = Gateway {
            child,
            port,
            admin_port,
            args: args.to_vec(),
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok((200, _)) = gateway.get("/readyz").await {
                return Ok(gateway);
            }
            if let Ok(Some(status)) = gateway.child.try_wait() {
                // Let the last lines arrive.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!("{status}: {}", printed.lock().unwrap()));
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
        self.try_connect(token, query)
            .await
            .map_err(|(status, _)| status)
    }

    /// As `connect_with`; Err carries the status and the `Retry-After` of a refused upgrade.
    pub async fn try_connect(
        &self,
        token: &str,
        query: &str,
    ) -> Result<Session, (u16, Option<String>)> {
        use tungstenite::client::IntoClientRequest;
        let mut request = self.ws_url(query).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => Ok(Session {
                stream,
                pending: Default::default(),
            }),
            Err(tungstenite::Error::Http(response)) => Err((
                response.status().as_u16(),
                response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            )),
            Err(e) => panic!("websocket: {e}"),
        }
    }

    /// GET `path`: the status and the body.
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let response = self.request("GET", path, &[], None).await?;
        Ok((
            response.status,
            String::from_utf8_lossy(&response.body).into_owned(),
        ))
    }

    /// GET `path` on the admin listener: the status and the body.
    pub async fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let response = http_request(self.admin_port, "GET", path, &[], None).await?;
        Ok((
            response.status,
            String::from_utf8_lossy(&response.body).into_owned(),
        ))
    }

    /// A gauge or counter of `/metrics`.
    pub async fn metric(&self, name: &str) -> i64 {
        let (_, text) = self.admin_get("/metrics").await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics"))
    }

    /// Waits until the gateway's live stream has passed `cursor` (AWAIT and REACHED on a
    /// connection of its own): what was committed up to it has been routed, and a
    /// subscription made now starts after it.
    pub async fn passed(&self, cursor: &str) -> Result<(), String> {
        // A user of its own each time: one user's admissions are limited (10 a second).
        static SETTLERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SETTLERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut session = self
            .connect_with(&token(&format!("settle-{n}"), &[]), "")
            .await
            .map_err(|status| format!("no connection to await on: {status}"))?;
        session
            .send(json!({"type": "AWAIT", "payload": {"cursor": cursor, "ref": "passed"}}))
            .await;
        loop {
            match tokio::time::timeout(PATIENCE, session.next_or_close()).await {
                Ok(Ok(m)) if m["type"] == "REACHED" => return Ok(()),
                Ok(Ok(_)) => {}
                other => return Err(format!("no REACHED of {cursor}: {other:?}")),
            }
        }
    }

    /// Waits until the gateway judges the live stream by a newer access epoch than `seen`
    /// (`sync_access_epoch`): it has seen a change of who may read what.
    pub async fn access_epoch_after(&self, seen: i64) -> i64 {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let now = self.metric("sync_access_epoch").await;
                if now > seen {
                    return now;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the gateway saw the access change in time")
    }

    /// An HTTP/1.1 request with extra headers and an optional JSON body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> std::io::Result<HttpResponse> {
        http_request(self.port, method, path, headers, body).await
    }

    /// `GET /v1/snapshot/{path}` as `sub`: the cursor and the rows; Err with the status when
    /// it is not 200, or 0 when the request failed or the body was cut short.
    pub async fn snapshot(&self, sub: &str, path: &str) -> Result<(String, Vec<Value>), u16> {
        let auth = format!("Bearer {}", token(sub, &[]));
        let response = self
            .request(
                "GET",
                &format!("/v1/snapshot/{path}"),
                &[("Authorization", &auth)],
                None,
            )
            .await
            .map_err(|_| 0u16)?;
        if response.status != 200 {
            return Err(response.status);
        }
        if !response.complete {
            return Err(0);
        }
        let text = String::from_utf8(response.body).map_err(|_| 0u16)?;
        let mut lines = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap());
        let cursor = lines
            .next()
            .and_then(|first| first["cursor"].as_str().map(str::to_owned));
        Ok((
            cursor.expect("the first line holds the cursor"),
            lines.collect(),
        ))
    }

    /// A JSON request as `user`: the status and the JSON answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        user: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let token = format!("Bearer {}", token(user, &[("role", json!("app_user"))]));
        let response = self
            .request(method, path, &[("Authorization", &token)], body.as_ref())
            .await
            .unwrap();
        let value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, value)
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

    /// The process's resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("the gateway runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// SIGKILL through a shared handle (the process is reaped on drop).
    pub fn kill_shared(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// An HTTP/1.1 request to 127.0.0.1:`port` with extra headers and an optional JSON body.
/// A body the server cuts short is kept, with `complete` false.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> std::io::Result<HttpResponse> {
    // A client per request: a pooled connection would outlive the test's runtime. Redirects
    // are the tests' to see.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        // A proxy of the machine's environment does not reach 127.0.0.1.
        .no_proxy()
        .build()
        .map_err(std::io::Error::other)?;
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(std::io::Error::other)?;
    let mut request = client.request(method, format!("http://127.0.0.1:{port}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json")
            .body(body.to_string());
    }
    let mut response = request.send().await.map_err(std::io::Error::other)?;
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let complete = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
        complete,
    })
}

fn binary() -> PathBuf {
    // `make soak` runs its large tests against the release build.
    if let Some(path) = std::env::var_os("PG_SYNC_GATEWAY") {
        return path.into();
    }
    // target/<profile>/deps/<test binary> → target/<profile>/sync-gateway
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("sync-gateway")
}

/// An HTTP response.
pub struct HttpResponse {
    pub status: u16,
    /// (name in lower case, value).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The whole body arrived (a chunked body ended with its closing chunk).
    pub complete: bool,
}

impl HttpResponse {
    /// The value of header `name` (any case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find_map(|(n, value)| (*n == name).then_some(value.as_str()))
    }
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
    /// Messages that arrived while `subscribe` waited for its answer, delivered next.
    pending: std::collections::VecDeque<Value>,
}

impl Session {
    pub async fn send(&mut self, message: Value) {
        self.send_text(&message.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("send");
    }

    /// Sends, or says the connection is gone.
    pub async fn try_send(&mut self, message: Value) -> bool {
        self.stream
            .send(Message::text(message.to_string()))
            .await
            .is_ok()
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The sending half; what arrives is read and dropped by a task of its own, so that the
    /// server never finds this client slow.
    pub fn discarding(self) -> SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message> {
        let (sink, stream) = self.stream.split();
        tokio::spawn(stream.for_each(|_| async {}));
        sink
    }

    /// The next JSON message (pings are answered by the library), or None when the server
    /// closed the connection; panics after PATIENCE.
    pub async fn next(&mut self) -> Option<Value> {
        self.next_or_close().await.ok()
    }

    /// The next JSON message, or the close code when the connection ends.
    pub async fn next_or_close(&mut self) -> Result<Value, Option<u16>> {
        if let Some(message) = self.pending.pop_front() {
            return Ok(message);
        }
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

    /// The next JSON message if one arrives within `wait`: None when none did, Err with the
    /// close code when the connection ended.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Result<Value, Option<u16>>> {
        if let Some(message) = self.pending.pop_front() {
            return Some(Ok(message));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()?;
            return Some(match frame {
                Some(Ok(Message::Text(text))) => Ok(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(frame))) => Err(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Err(None),
            });
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

    /// Subscribes and waits for its SUBSCRIBED (or an ERROR, which fails the test); other
    /// messages arriving meanwhile (live changes of other subscriptions) wait in `pending`.
    pub async fn subscribe(&mut self, payload: Value) -> Value {
        let entity = payload["entityCode"].clone();
        self.send(json!({"type": "SUBSCRIBE", "payload": payload}))
            .await;
        let mut other = Vec::new();
        let answer = loop {
            let message = self.next().await.expect("connection open");
            match message["type"].as_str() {
                Some("SUBSCRIBED") if message["payload"]["entityCode"] == entity => break message,
                Some("ERROR") => panic!("expected SUBSCRIBED, got {message}"),
                _ => other.push(message),
            }
        };
        self.pending.extend(other);
        answer["payload"].clone()
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
