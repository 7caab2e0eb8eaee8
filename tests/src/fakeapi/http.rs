//! The wire side of the fake API server: one request per connection (`Connection: close`), lists
//! and patches answered with a Content-Length, watches streamed as chunked JSON lines.
use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::broadcast::error::RecvError,
};

use super::{Change, Kind, Request, Shared, patch_object};

pub(super) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((conn, _)) = listener.accept().await {
        tokio::spawn(handle(conn, shared.clone()));
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_target(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    (path.to_string(), query)
}

/// Reads one request: method, target, body.
async fn read_request(conn: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let (method, target) = (first.next()?.to_string(), first.next()?.to_string());
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((method, target, body))
}

async fn respond(conn: &mut TcpStream, code: u16, body: &Value) {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    let text = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(text.as_bytes()).await;
    let _ = conn.shutdown().await;
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code })
}

/// `fieldSelector=spec.nodeName=X` (the only one the agent uses) and nothing else.
fn matches(obj: &Value, query: &BTreeMap<String, String>) -> bool {
    match query.get("fieldSelector").filter(|s| !s.is_empty()) {
        None => true,
        Some(sel) => sel.split(',').all(|term| match term.split_once('=') {
            Some(("spec.nodeName", node)) => obj["spec"]["nodeName"].as_str() == Some(node),
            _ => false,
        }),
    }
}

async fn handle(mut conn: TcpStream, shared: Arc<Shared>) {
    let Some((method, target, body)) = read_request(&mut conn).await else {
        return;
    };
    let (path, query) = parse_target(&target);
    let request = Request {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
    };
    shared.cluster().requests.push(request.clone());
    if shared.down.load(Ordering::SeqCst) {
        return; // dropped: the client sees the connection close without an answer
    }
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "pods"]) => list_or_watch(conn, &shared, Kind::Pod, &request).await,
        ("GET", ["api", "v1", "namespaces"]) => {
            list_or_watch(conn, &shared, Kind::Namespace, &request).await
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            get_one(conn, &shared, (Kind::Pod, ns.to_string(), name.to_string())).await
        }
        ("GET", ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name]) => {
            get_one(
                conn,
                &shared,
                (Kind::DaemonSet, ns.to_string(), name.to_string()),
            )
            .await
        }
        ("GET", ["api", "v1", "namespaces", name]) => {
            get_one(
                conn,
                &shared,
                (Kind::Namespace, String::new(), name.to_string()),
            )
            .await
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let key = (Kind::Pod, ns.to_string(), name.to_string());
            match serde_json::from_slice::<Value>(&body) {
                Ok(patch) => match patch_object(&shared, &key, &patch) {
                    Some(obj) => respond(&mut conn, 200, &obj).await,
                    None => {
                        let msg = format!("pods \"{name}\" not found");
                        respond(&mut conn, 404, &status(404, "NotFound", &msg)).await
                    }
                },
                Err(e) => respond(&mut conn, 400, &status(400, "BadRequest", &e.to_string())).await,
            }
        }
        _ => respond(&mut conn, 404, &status(404, "NotFound", &path)).await,
    }
}

/// One object by name, as `kubectl get` reads it.
async fn get_one(mut conn: TcpStream, shared: &Shared, key: super::Key) {
    let found = shared.cluster().objects.get(&key).cloned();
    match found {
        Some(obj) => respond(&mut conn, 200, &obj).await,
        None => {
            let msg = format!("{} \"{}\" not found", key.0.name(), key.2);
            respond(&mut conn, 404, &status(404, "NotFound", &msg)).await
        }
    }
}

async fn list_or_watch(mut conn: TcpStream, shared: &Shared, kind: Kind, req: &Request) {
    if req.is_watch() {
        return watch(conn, shared, kind, req).await;
    }
    if shared.down.load(Ordering::SeqCst) {
        return; // went down while this request waited
    }
    let list = {
        let c = shared.cluster();
        let items: Vec<&Value> = c
            .objects
            .iter()
            .filter(|((k, _, _), obj)| *k == kind && matches(obj, &req.query))
            .map(|(_, obj)| obj)
            .collect();
        json!({ "kind": kind.list_kind(), "apiVersion": "v1",
                "metadata": { "resourceVersion": c.rv.to_string() }, "items": items })
    };
    respond(&mut conn, 200, &list).await;
}

async fn send_chunk(conn: &mut TcpStream, event: &Value) -> bool {
    let line = format!("{event}\n");
    let chunk = format!("{:x}\r\n{line}\r\n", line.len());
    conn.write_all(chunk.as_bytes()).await.is_ok()
}

fn event(change: &Change) -> Value {
    json!({ "type": change.kind_of_change, "object": change.object })
}

async fn watch(mut conn: TcpStream, shared: &Shared, kind: Kind, req: &Request) {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let mut epoch = shared.watch_epoch.subscribe();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    // Subscribe and read the backlog under one lock: nothing falls between them.
    let subscribed = {
        let c = shared.cluster();
        (from == 0 || from >= c.compacted).then(|| {
            let backlog: Vec<Arc<Change>> = c
                .history
                .iter()
                .filter(|ch| ch.rv > from)
                .cloned()
                .collect();
            (shared.changes.subscribe(), backlog, c.rv.max(from))
        })
    };
    let Some((mut rx, backlog, mut last_rv)) = subscribed else {
        let gone = status(410, "Expired", &format!("too old resource version: {from}"));
        send_chunk(&mut conn, &json!({ "type": "ERROR", "object": gone })).await;
        let _ = conn.write_all(b"0\r\n\r\n").await;
        return;
    };
    for change in backlog {
        if change.kind == kind
            && matches(&change.object, &req.query)
            && !send_chunk(&mut conn, &event(&change)).await
        {
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(shared.bookmark_every);
    loop {
        tokio::select! {
            biased;
            // Cut mid-stream, without the terminating chunk.
            _ = epoch.changed() => return,
            r = rx.recv() => match r {
                // Down: nothing more gets out, even what was already on its way.
                _ if shared.down.load(Ordering::SeqCst) => return,
                Ok(change) => {
                    last_rv = change.rv;
                    if change.kind == kind && matches(&change.object, &req.query)
                        && !send_chunk(&mut conn, &event(&change)).await {
                        return;
                    }
                }
                // Too slow a reader: cut, the client resumes from what it saw.
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                if bookmarks {
                    let bm = json!({ "type": "BOOKMARK", "object": { "kind": kind.name(), "apiVersion": "v1",
                                      "metadata": { "resourceVersion": last_rv.to_string() } } });
                    if !send_chunk(&mut conn, &bm).await {
                        return;
                    }
                    shared.cluster().bookmarks.push((kind, last_rv));
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = conn.write_all(b"0\r\n\r\n").await;
                return;
            }
        }
    }
}
