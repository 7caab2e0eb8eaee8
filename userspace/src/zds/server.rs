//! The agent's ZDS socket: every ztunnel that connects (two during a rolling update) gets the
//! snapshot of this node's in-pod workloads, then each change, one request at a time. A peer
//! that breaks the protocol or stops answering loses its session, with who and why logged; the
//! others keep theirs, and the peer gets a full snapshot when it reconnects.
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use super::{
    Metrics,
    messages::WorkloadInfo,
    seqpacket::{Listener, Peer},
    session::{ACK_TIMEOUT, Session, SessionError, SnapshotReport, WorkloadNetns},
};

/// An in-pod workload as the agent knows it: the netns is opened when it is sent.
#[derive(Clone, Debug, PartialEq)]
pub struct InPodWorkload {
    pub uid: String,
    pub info: WorkloadInfo,
    pub netns: PathBuf,
    /// The pod's addresses (not sent: ztunnel learns them from its control plane).
    pub ips: Vec<std::net::IpAddr>,
}

impl InPodWorkload {
    /// `keep` instead of `add` when the netns is gone (the pod is being deleted): ztunnel
    /// keeps what it has until the `del`.
    fn to_send(&self) -> WorkloadNetns {
        WorkloadNetns {
            uid: self.uid.clone(),
            info: self.info.clone(),
            netns: File::open(&self.netns).ok().map(OwnedFd::from),
        }
    }
}

/// How often an idle session checks that its ztunnel is still there.
const IDLE_CHECK: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
enum Change {
    Add(InPodWorkload),
    Del(String),
}

/// What one connected ztunnel has been told, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerState {
    pub pid: Option<i32>,
    pub acked: Vec<String>,
    /// Workloads ztunnel refused, with its error; retried with backoff.
    pub refused: BTreeMap<String, String>,
}

#[derive(Default)]
struct Shared {
    /// Whether `set` was called: until the agent knows its pods, a snapshot would be empty
    /// and ztunnel would drop every pod it serves (a restarted agent's first moments).
    synced: bool,
    workloads: BTreeMap<String, InPodWorkload>,
    peers: Vec<(u64, mpsc::Sender<Change>)>,
    states: BTreeMap<u64, PeerState>,
    next_peer: u64,
    /// Where the peers' states are written for `zdivert status`, on every change.
    status_file: Option<PathBuf>,
}

impl Shared {
    /// Writes the peers' states to the status file (replaced whole, never seen half-written).
    /// A failed write is logged: status is a view, serving goes on.
    fn publish(&self) {
        let Some(path) = &self.status_file else {
            return;
        };
        let peers: Vec<&PeerState> = self.states.values().collect();
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&serde_json::json!({ "peers": peers }))
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            log::warn!("zds: status file {}: {e}", path.display());
        }
    }
}

/// Told, in a ztunnel's session thread, of the workloads that ztunnel (its pid) acked: for
/// its snapshot before `snapshot_sent` goes out (ztunnel is not ready before), for an add
/// once the ack is recorded (a pod's start does not wait for it).
pub type OnAcked = Arc<dyn Fn(i32, &[InPodWorkload]) + Send + Sync>;

#[derive(Clone)]
pub struct Server {
    shared: Arc<Mutex<Shared>>,
    synced: Arc<Condvar>,
    /// Notified whenever a peer's state changes (an ack, a refusal, a peer gone).
    recorded: Arc<Condvar>,
    path: PathBuf,
    metrics: Metrics,
    on_acked: Arc<std::sync::OnceLock<OnAcked>>,
}

impl Server {
    /// Serves `path` until the process ends.
    pub fn start(path: &Path) -> std::io::Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = Listener::bind(path)?;
        let server = Server {
            shared: Arc::default(),
            synced: Arc::default(),
            recorded: Arc::default(),
            path: path.into(),
            metrics: Metrics::default(),
            on_acked: Arc::default(),
        };
        let accepting = server.clone();
        thread::Builder::new()
            .name("zds-accept".into())
            .spawn(move || accepting.accept_loop(listener))?;
        Ok(server)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, the peers' states are kept in `file` for `zdivert status`.
    pub fn publish_to(&self, file: &Path) {
        let mut shared = self.shared.lock().expect("zds state");
        shared.status_file = Some(file.into());
        shared.publish();
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sets what is told of each ack (once; before the first `set`, which no session starts
    /// before).
    pub fn on_acked(&self, hook: OnAcked) {
        let _ = self.on_acked.set(hook);
    }

    fn tell_acked(&self, pid: Option<i32>, acked: &[InPodWorkload]) {
        if let (Some(hook), Some(pid)) = (self.on_acked.get(), pid)
            && !acked.is_empty()
        {
            hook(pid, acked);
        }
    }

    /// Makes `desired` the workloads every ztunnel serves: adds and dels for the difference.
    /// The first call also lets ztunnels that connected before it have their snapshot.
    pub fn set(&self, desired: BTreeMap<String, InPodWorkload>) {
        let mut shared = self.shared.lock().expect("zds state");
        let mut changes = Vec::new();
        for uid in shared.workloads.keys() {
            if !desired.contains_key(uid) {
                changes.push(Change::Del(uid.clone()));
            }
        }
        for (uid, w) in &desired {
            if shared.workloads.get(uid) != Some(w) {
                changes.push(Change::Add(w.clone()));
                // What a peer acked was the workload as it was (another netns): no longer.
                for state in shared.states.values_mut() {
                    state.acked.retain(|u| u != uid);
                }
            }
        }
        shared.workloads = desired;
        shared.synced = true;
        self.synced.notify_all();
        // A peer whose thread ended is dropped here; it reconnects for a new snapshot.
        shared
            .peers
            .retain(|(_, tx)| changes.iter().all(|c| tx.send(c.clone()).is_ok()));
    }

    /// Waits until a connected ztunnel has acked `uid` as it is now, or `deadline`: the error
    /// says what was seen instead (no ztunnel connected, or its refusal).
    pub fn wait_acked(&self, uid: &str, deadline: Instant) -> Result<(), String> {
        let mut shared = self.shared.lock().expect("zds state");
        loop {
            if shared
                .states
                .values()
                .any(|s| s.acked.iter().any(|u| u == uid))
            {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let refusals: Vec<&String> = shared
                    .states
                    .values()
                    .filter_map(|s| s.refused.get(uid))
                    .collect();
                return Err(match (shared.states.len(), refusals.first()) {
                    (0, _) => "no ztunnel is connected over ZDS".into(),
                    (_, Some(error)) => format!("ztunnel refused it: {error}"),
                    (n, None) => format!("no ack from the {n} connected ztunnel(s) in time"),
                });
            }
            shared = self
                .recorded
                .wait_timeout(shared, deadline - now)
                .expect("zds state")
                .0;
        }
    }

    /// The connected ztunnels and what each acked or refused.
    pub fn peers(&self) -> Vec<PeerState> {
        let shared = self.shared.lock().expect("zds state");
        shared.states.values().cloned().collect()
    }

    fn accept_loop(self, listener: Listener) {
        loop {
            match listener.accept() {
                Ok(peer) => self.serve(peer),
                Err(e) => {
                    log::error!("zds {}: accept: {e}", self.path.display());
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Snapshot and registration under one lock: every change after the snapshot reaches the
    /// peer through its channel, none before it twice.
    fn serve(&self, peer: Peer) {
        let (tx, rx) = mpsc::channel();
        let (id, snapshot) = {
            let mut shared = self
                .synced
                .wait_while(self.shared.lock().expect("zds state"), |s| !s.synced)
                .expect("zds state");
            let id = shared.next_peer;
            shared.next_peer += 1;
            shared.peers.push((id, tx));
            shared.states.insert(id, PeerState::default());
            shared.publish();
            let snapshot: Vec<InPodWorkload> = shared.workloads.values().cloned().collect();
            (id, snapshot)
        };
        let server = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("zds-peer-{id}"))
            .spawn(move || {
                let pid = peer.peer_pid().ok();
                let who = pid.map_or("ztunnel (pid unknown)".into(), |p| {
                    format!("ztunnel pid {p}")
                });
                if let Err(e) = server.session(id, peer, pid, snapshot, rx) {
                    log::warn!(
                        "zds: {who}: {}; it gets a new snapshot when it reconnects",
                        crate::error::Chain(&e)
                    );
                }
                let mut shared = server.shared.lock().expect("zds state");
                shared.peers.retain(|(p, _)| *p != id);
                shared.states.remove(&id);
                shared.publish();
            });
        if let Err(e) = spawned {
            log::error!("zds: cannot serve a ztunnel: {e}");
        }
    }

    fn session(
        &self,
        id: u64,
        peer: Peer,
        pid: Option<i32>,
        snapshot: Vec<InPodWorkload>,
        changes: mpsc::Receiver<Change>,
    ) -> Result<(), SessionError> {
        let sent: Vec<WorkloadNetns> = snapshot.iter().map(InPodWorkload::to_send).collect();
        let (mut session, report) = Session::open_with(peer, ACK_TIMEOUT, &sent, |report| {
            let refused: Vec<&str> = (report.refused.iter())
                .filter_map(|e| match e {
                    SessionError::Refused { uid, .. } => Some(uid.as_str()),
                    _ => None,
                })
                .collect();
            let added: Vec<InPodWorkload> = (snapshot.iter().zip(&sent))
                .filter(|(w, s)| s.netns.is_some() && !refused.contains(&w.uid.as_str()))
                .map(|(w, _)| w.clone())
                .collect();
            self.tell_acked(pid, &added);
        })
        .inspect_err(|_| self.metrics.count("snapshot", "failed", 1))?;
        self.metrics.peers.inc();
        let _connected = PeerGauge(&self.metrics);
        let mut retries = self.took_snapshot(id, pid, &snapshot, &sent, report);
        loop {
            let change = match changes.recv_timeout(retries.wait().min(IDLE_CHECK)) {
                Ok(change) => Some(change),
                Err(mpsc::RecvTimeoutError::Timeout) if session.peer_gone() => {
                    return Err(SessionError::Closed);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => retries.due().map(Change::Add),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let Some(change) = change else { continue };
            let request = match change {
                Change::Add(_) => "add",
                Change::Del(_) => "del",
            };
            let (uid, result) = match &change {
                Change::Add(w) => (w.uid.clone(), session.add(&w.to_send())),
                Change::Del(uid) => {
                    retries.forget(uid);
                    (uid.clone(), session.del(uid))
                }
            };
            let outcome = match &result {
                Ok(()) => "acked",
                Err(SessionError::Refused { .. }) => "refused",
                Err(_) => "failed",
            };
            self.metrics.count(request, outcome, 1);
            match result {
                Ok(()) => {
                    retries.forget(&uid);
                    self.record(id, pid, |s| {
                        s.refused.remove(&uid);
                        s.acked.retain(|u| *u != uid);
                        if matches!(change, Change::Add(_)) {
                            s.acked.push(uid.clone());
                        }
                    });
                    // After the record: a pod's start waits for the ack, not for this.
                    if let Change::Add(w) = &change {
                        self.tell_acked(pid, std::slice::from_ref(w));
                    }
                }
                Err(SessionError::Refused { error, .. }) => {
                    let who = pid.map_or("unknown".into(), |p| p.to_string());
                    log::warn!("zds: ztunnel pid {who} refused {uid}: {error}; retrying");
                    self.refused(id, &uid, &error);
                    if let Change::Add(w) = change {
                        retries.schedule(w);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Counts and records what the snapshot achieved; refused workloads are retried later.
    fn took_snapshot(
        &self,
        id: u64,
        pid: Option<i32>,
        snapshot: &[InPodWorkload],
        sent: &[WorkloadNetns],
        report: SnapshotReport,
    ) -> Retries {
        let keeps = sent.iter().filter(|w| w.netns.is_none()).count() as u64;
        let refused_n = report.refused.len() as u64;
        let adds = sent.len() as u64 - keeps;
        self.metrics.count("keep", "acked", keeps);
        self.metrics
            .count("add", "acked", adds.saturating_sub(refused_n));
        self.metrics.count("add", "refused", refused_n);
        self.metrics.count("snapshot", "acked", 1);
        log::info!(
            "zds: ztunnel pid {} took the snapshot of {} workloads",
            pid.map_or("unknown".into(), |p| p.to_string()),
            sent.len()
        );
        let mut retries = Retries::default();
        let mut refused = BTreeMap::new();
        for refusal in report.refused {
            if let SessionError::Refused { uid, error, .. } = refusal
                && let Some(w) = snapshot.iter().find(|w| w.uid == uid)
            {
                retries.schedule(w.clone());
                refused.insert(uid, error);
            }
        }
        self.record(id, pid, |s| {
            s.acked = snapshot
                .iter()
                .filter(|w| !refused.contains_key(&w.uid))
                .map(|w| w.uid.clone())
                .collect();
            s.refused = refused;
        });
        retries
    }

    fn record(&self, id: u64, pid: Option<i32>, update: impl FnOnce(&mut PeerState)) {
        let mut shared = self.shared.lock().expect("zds state");
        if let Some(state) = shared.states.get_mut(&id) {
            state.pid = pid.or(state.pid);
            update(state);
        }
        shared.publish();
        self.recorded.notify_all();
    }

    fn refused(&self, id: u64, uid: &str, error: &str) {
        self.record(id, None, |s| {
            s.refused.insert(uid.into(), error.into());
        });
    }
}

/// One connected ztunnel in `zds_peers`, for as long as its session lives.
struct PeerGauge<'a>(&'a Metrics);

impl Drop for PeerGauge<'_> {
    fn drop(&mut self) {
        self.0.peers.dec();
    }
}

/// Refused adds, each retried after a delay that doubles up to a cap.
#[derive(Default)]
struct Retries {
    pending: BTreeMap<String, (InPodWorkload, Instant, Duration)>,
}

impl Retries {
    const FIRST: Duration = Duration::from_millis(200);
    const CAP: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(3600);

    fn schedule(&mut self, w: InPodWorkload) {
        let delay = self
            .pending
            .get(&w.uid)
            .map_or(Self::FIRST, |(_, _, d)| (*d * 2).min(Self::CAP));
        self.pending
            .insert(w.uid.clone(), (w, Instant::now() + delay, delay));
    }

    fn forget(&mut self, uid: &str) {
        self.pending.remove(uid);
    }

    fn wait(&self) -> Duration {
        self.pending
            .values()
            .map(|(_, at, _)| at.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(Self::IDLE)
    }

    /// The first workload whose retry is due; it stays scheduled until acked or forgotten.
    fn due(&mut self) -> Option<InPodWorkload> {
        let now = Instant::now();
        let (w, at, _) = self.pending.values_mut().find(|(_, at, _)| *at <= now)?;
        *at = now + Self::CAP; // re-armed by `schedule` if refused again
        Some(w.clone())
    }
}
