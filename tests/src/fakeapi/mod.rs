//! A fake Kubernetes API server speaking real HTTP/1.1, enough for the agent's kube-rs client:
//! list and watch (`resourceVersion`, bookmarks, `fieldSelector=spec.nodeName=…`, 410 Gone for
//! compacted history) on pods and namespaces, and merge-patch of pods. Faults on demand: down
//! (connections dropped), slow (every response delayed), watches cut, history compacted. It
//! listens on loopback of whichever netns each listener is opened in, so an agent inside a
//! simulated node reaches it at 127.0.0.1.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::sync::broadcast;

mod http;
pub mod objects;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    /// Only stored and read back by name (no list or watch).
    DaemonSet,
}

impl Kind {
    fn of(obj: &Value) -> Result<Kind> {
        match obj["kind"].as_str() {
            Some("Pod") => Ok(Kind::Pod),
            Some("Namespace") => Ok(Kind::Namespace),
            Some("DaemonSet") => Ok(Kind::DaemonSet),
            other => anyhow::bail!("the fake API server has no kind {other:?}"),
        }
    }
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Pod => "PodList",
            Kind::Namespace => "NamespaceList",
            Kind::DaemonSet => "DaemonSetList",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::DaemonSet => "DaemonSet",
        }
    }
}

type Key = (Kind, String, String);

fn key_of(kind: Kind, obj: &Value) -> Key {
    let meta = &obj["metadata"];
    (
        kind,
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// One change, as a watch sends it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: Kind,
    pub kind_of_change: &'static str,
    pub object: Value,
}

/// A request the server answered (or dropped), for tests that check how the client behaved.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }
}

#[derive(Default)]
struct Cluster {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Change>>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    requests: Vec<Request>,
    /// Every bookmark sent: the kind watched and the resourceVersion.
    bookmarks: Vec<(Kind, u64)>,
}

struct Shared {
    cluster: Mutex<Cluster>,
    changes: broadcast::Sender<Arc<Change>>,
    down: AtomicBool,
    delay_ms: AtomicU64,
    /// Bumped to cut every open watch.
    watch_epoch: tokio::sync::watch::Sender<u64>,
    bookmark_every: Duration,
}

impl Shared {
    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FakeApi {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
}

impl FakeApi {
    pub fn start() -> Result<FakeApi> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (changes, _) = broadcast::channel(4096);
        Ok(FakeApi {
            rt,
            shared: Arc::new(Shared {
                cluster: Mutex::new(Cluster {
                    rv: 100,
                    ..Cluster::default()
                }),
                changes,
                down: AtomicBool::new(false),
                delay_ms: AtomicU64::new(0),
                watch_epoch: tokio::sync::watch::channel(0).0,
                bookmark_every: Duration::from_millis(500),
            }),
        })
    }

    /// A listener on 127.0.0.1 of the calling thread's netns.
    pub fn listen(&self) -> Result<SocketAddr> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        self.serve(l)
    }

    /// A listener on 127.0.0.1 inside the netns at `ns` (a simulated node).
    pub fn listen_in(&self, ns: &Path) -> Result<SocketAddr> {
        let l = zdivert::netns::run_in(ns, || std::net::TcpListener::bind("127.0.0.1:0"))??;
        self.serve(l)
    }

    fn serve(&self, l: std::net::TcpListener) -> Result<SocketAddr> {
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let _guard = self.rt.enter();
        let listener = tokio::net::TcpListener::from_std(l)?;
        self.rt
            .spawn(http::accept_loop(listener, self.shared.clone()));
        Ok(addr)
    }

    /// A kubeconfig for a client of the listener at `addr`, written to `dir`.
    pub fn write_kubeconfig(dir: &Path, name: &str, addr: SocketAddr) -> Result<PathBuf> {
        let path = dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n\
             current-context: fake\n"
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Creates or replaces an object (kind from its `kind` field).
    pub fn apply(&self, mut obj: Value) -> Result<()> {
        let kind = Kind::of(&obj)?;
        let key = key_of(kind, &obj);
        let mut c = self.shared.cluster();
        let existed = c.objects.contains_key(&key);
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        self.record(
            &mut c,
            kind,
            if existed { "MODIFIED" } else { "ADDED" },
            obj,
        );
        Ok(())
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let mut c = self.shared.cluster();
        let obj = c
            .objects
            .remove(&(kind, namespace.into(), name.into()))
            .with_context(|| format!("no {} {namespace}/{name}", kind.name()))?;
        self.record(&mut c, kind, "DELETED", obj);
        Ok(())
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .cluster()
            .objects
            .get(&(kind, namespace.into(), name.into()))
            .cloned()
    }

    /// Applies a JSON merge patch (RFC 7386) to an object.
    pub fn patch(&self, kind: Kind, namespace: &str, name: &str, patch: &Value) -> Result<Value> {
        patch_object(&self.shared, &(kind, namespace.into(), name.into()), patch)
            .with_context(|| format!("no {} {namespace}/{name}", kind.name()))
    }

    fn record(&self, c: &mut Cluster, kind: Kind, what: &'static str, obj: Value) {
        record(&self.shared, c, kind, what, obj);
    }

    /// Connections are dropped without an answer while down.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.cut_watches();
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Every open watch is cut mid-stream (the client resumes from its last resourceVersion).
    pub fn cut_watches(&self) {
        self.shared.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Compacts the history and cuts the watches: resuming gets 410 Gone, the client relists.
    pub fn expire(&self) {
        let mut c = self.shared.cluster();
        c.compacted = c.rv + 1;
        c.history.clear();
        drop(c);
        self.cut_watches();
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.cluster().requests.clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.cluster().rv
    }

    /// The highest resourceVersion a bookmark of a `kind` watch has carried so far.
    pub fn bookmarked(&self, kind: Kind) -> Option<u64> {
        let c = self.shared.cluster();
        c.bookmarks
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, rv)| *rv)
            .max()
    }

    /// Watch requests of `path` so far.
    pub fn watches(&self, path: &str) -> usize {
        self.shared
            .cluster()
            .requests
            .iter()
            .filter(|r| r.path == path && r.is_watch())
            .count()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.cut_watches();
    }
}

fn record(shared: &Shared, c: &mut Cluster, kind: Kind, what: &'static str, mut obj: Value) {
    c.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(c.rv.to_string());
    let key = key_of(kind, &obj);
    if what != "DELETED" {
        c.objects.insert(key, obj.clone());
    }
    let change = Arc::new(Change {
        rv: c.rv,
        kind,
        kind_of_change: what,
        object: obj,
    });
    c.history.push(change.clone());
    // Sent under the lock: watches see changes in resourceVersion order.
    let _ = shared.changes.send(change);
}

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn patch_object(shared: &Shared, key: &Key, patch: &Value) -> Option<Value> {
    let mut c = shared.cluster();
    let mut obj = c.objects.get(key)?.clone();
    merge(&mut obj, patch);
    record(shared, &mut c, key.0, "MODIFIED", obj);
    c.objects.get(key).cloned()
}
