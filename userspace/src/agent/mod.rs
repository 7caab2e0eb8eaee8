//! The reconcile loop, whatever the source: level-triggered (the whole desired state is applied,
//! never a delta), debounced, repeated periodically, retried sooner after a failure. Sources send
//! complete desired states; a source that cannot produce one (bad file, API server gone) sends
//! nothing, and the last good state stays in the kernel.
use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use crate::{
    dataplane::{Dataplane, ZtunnelState},
    nl::Link,
    state::{NodeState, PodId},
};

pub mod cni;
pub mod file;
pub mod health;
pub mod links;

/// What the reconcile loop is told.
#[derive(Debug)]
pub enum Input {
    /// A complete desired state from the source.
    State(NodeState),
    /// Veths that just appeared on the node: held at once, classified by the next applies.
    NewLinks(Vec<Link>),
    /// The CNI plugin's request for one pod, answered once done.
    Cni(cni::Request),
}

impl From<NodeState> for Input {
    fn from(state: NodeState) -> Self {
        Input::State(state)
    }
}

use health::Health;

/// How soon a failed apply is retried.
const RETRY: Duration = Duration::from_secs(1);
/// How often the stop flag is looked at while nothing happens.
const TICK: Duration = Duration::from_millis(200);
/// How often a ready ztunnel's listeners are looked at between applies: an exited ztunnel is
/// reported (and re-applied) within this, not at the next resync.
const ZTUNNEL_CHECK: Duration = Duration::from_secs(2);

pub struct Reconciler {
    pub resync: Duration,
    /// Quiet time after a change before applying: a burst of API events becomes one apply.
    pub debounce: Duration,
    pub health: Arc<Health>,
    /// Told which pods are captured after every successful apply (the status annotation).
    pub on_applied: Option<Box<dyn Fn(BTreeSet<PodId>) + Send>>,
    /// What the last apply found of ztunnel, to log changes only.
    pub last_ztunnel: std::sync::Mutex<ZtunnelState>,
    /// Where the CNI plugin's pods are kept across restarts (`None`: in memory only).
    pub cni_pods_file: Option<std::path::PathBuf>,
}

impl Reconciler {
    pub fn run(&self, dp: &mut dyn Dataplane, inputs: Receiver<Input>, stop: &AtomicBool) {
        let mut desired: Option<NodeState> = None;
        // Veths held until a pod is found behind them; an earlier agent's holds are adopted.
        let mut held: BTreeSet<u32> = dp
            .held()
            .unwrap_or_else(|e| {
                log::error!("reading the held veths: {}", e.chain());
                Vec::new()
            })
            .into_iter()
            .collect();
        let mut due: Option<Instant> = None;
        // A burst that never quiets down is still applied this long after it started.
        let mut first_change: Option<Instant> = None;
        let mut checked = Instant::now();
        // Pods the CNI plugin added, with the netns the runtime gave, until their DEL.
        let mut cni = self
            .cni_pods_file
            .clone()
            .map_or_else(cni::Overlay::default, cni::Overlay::load);
        // CNI requests that came before the source's first complete state: applying without
        // it would tell ztunnel that every other pod is gone.
        let mut waiting: Vec<cni::Request> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let wait = due.map_or(TICK, |d| {
                d.saturating_duration_since(Instant::now()).min(TICK)
            });
            match inputs.recv_timeout(wait) {
                Ok(Input::NewLinks(links)) => {
                    let new: Vec<Link> = links
                        .into_iter()
                        .filter(|l| !held.contains(&l.index))
                        .collect();
                    if new.is_empty() {
                        continue;
                    }
                    let names: Vec<&str> = new.iter().map(|l| l.name.as_str()).collect();
                    match dp.hold(&new) {
                        Ok(()) => log::info!(
                            "new veth {}: its TCP is held until its pod is known",
                            names.join(", ")
                        ),
                        Err(e) => {
                            log::error!("holding new veth {}: {}", names.join(", "), e.chain())
                        }
                    }
                    held.extend(new.iter().map(|l| l.index));
                    self.health.set_held(held.len());
                    // The source may know the pod already: classify soon.
                    let soon = Instant::now() + self.debounce;
                    due = Some(due.map_or(soon, |d| d.min(soon)));
                    continue;
                }
                Ok(Input::Cni(request)) => {
                    match &desired {
                        Some(state) => self.serve_cni(dp, state, &mut held, &mut cni, request),
                        None => waiting.push(request),
                    }
                    continue;
                }
                Ok(Input::State(state)) => {
                    if desired.as_ref() != Some(&state) {
                        log::info!(
                            "desired state changed: {} ambient pods, ztunnel {}",
                            state.pods.len(),
                            state
                                .ztunnel
                                .as_ref()
                                .map_or("none".into(), |z| z.pod.to_string())
                        );
                        let now = Instant::now();
                        let first = *first_change.get_or_insert(now);
                        due = Some((now + self.debounce).min(first + self.debounce * 10));
                    }
                    desired = Some(state);
                    for request in waiting.drain(..) {
                        let state = desired.as_ref().expect("just set");
                        self.serve_cni(dp, state, &mut held, &mut cni, request);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The source is gone (the agent is stopping); the kernel keeps its state.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.health.beat();
            waiting.retain(|r| !r.expired());
            if checked.elapsed() >= ZTUNNEL_CHECK {
                checked = Instant::now();
                if self.ztunnel_stopped_listening() {
                    due = Some(checked);
                }
            }
            let Some(state) = &desired else { continue };
            if due.is_some_and(|d| Instant::now() < d) {
                continue;
            }
            first_change = None;
            let applied = self.apply_with(dp, state, &mut held, &mut cni);
            due = Some(Instant::now() + if applied.ok { self.resync } else { RETRY });
        }
    }

    /// Applies the source's `state` with the CNI plugin's pods and the held veths; keeps the
    /// veths still held.
    fn apply_with(
        &self,
        dp: &mut dyn Dataplane,
        state: &NodeState,
        held: &mut BTreeSet<u32>,
        cni: &mut cni::Overlay,
    ) -> Applied {
        let mut merged = cni.merge(state);
        merged.held_links = held.clone();
        let mut applied = self.apply(dp, &merged);
        if let Some(still_held) = applied.held.take() {
            for gone in held.difference(&still_held) {
                log::info!("veth {gone}: released from the hold");
            }
            *held = still_held;
            self.health.set_held(held.len());
            // A held veth is looked at again soon: its pod's address may come any time.
            applied.ok &= held.is_empty();
        }
        applied
    }

    /// One CNI request, answered before returning: an ADD is applied at once (no debounce)
    /// and answered once the pod is captured and confirmed (in-pod: acked by ztunnel).
    fn serve_cni(
        &self,
        dp: &mut dyn Dataplane,
        state: &NodeState,
        held: &mut BTreeSet<u32>,
        cni: &mut cni::Overlay,
        request: cni::Request,
    ) {
        let pod = request.pod.clone();
        let outcome = match &request.command {
            cni::Command::Add(spec) => {
                cni.add(pod.clone(), spec.clone());
                if let Some(netns) = &spec.netns {
                    dp.recheck(netns);
                }
                let started = Instant::now();
                let applied = self.apply_with(dp, state, held, cni);
                let applied_in = started.elapsed();
                let outcome = applied.outcome_of(&pod).and_then(|()| {
                    dp.confirm(&pod, request.deadline)
                        .map_err(|e| e.chain().to_string())
                });
                log::debug!(
                    "cni ADD {pod}: applied in {applied_in:?}, confirmed {:?} later",
                    started.elapsed() - applied_in
                );
                outcome
            }
            cni::Command::Outside(netns) => {
                cni.add_outside(pod.clone(), netns.clone());
                Ok(())
            }
            cni::Command::Del => {
                cni.remove(&pod);
                // The source may still list it (its API object goes after its sandbox).
                if !state.pods.contains_key(&pod) {
                    self.apply_with(dp, state, held, cni);
                }
                Ok(())
            }
            cni::Command::Check => match cni.contains(&pod) || state.pods.contains_key(&pod) {
                true => self.apply_with(dp, state, held, cni).outcome_of(&pod),
                false => Err("not a pod this agent captures".into()),
            },
        };
        if let Err(why) = &outcome {
            log::warn!("cni {} {pod}: {why}", request.command.name());
        }
        request.answer(outcome);
    }

    /// Whether the ztunnel the last apply found ready has lost a listener since.
    fn ztunnel_stopped_listening(&self) -> bool {
        let last = self.last_ztunnel.lock().unwrap_or_else(|p| p.into_inner());
        let ZtunnelState::Ready { netns, .. } = &*last else {
            return false;
        };
        crate::ztunnel::listening(netns)
            .map(|ports| !crate::ztunnel::missing(&ports).is_empty())
            .unwrap_or(true)
    }

    /// Applies `state` and logs the outcome.
    fn apply(&self, dp: &mut dyn Dataplane, state: &NodeState) -> Applied {
        match dp.apply(state) {
            Ok(report) => {
                for (pod, e) in &report.failed {
                    log::warn!("{pod}: {}", e.chain());
                }
                // Said once per change, not on every apply.
                let mut last = self.last_ztunnel.lock().unwrap_or_else(|p| p.into_inner());
                if *last != report.ztunnel {
                    match report.ztunnel.is_ready() {
                        true => log::info!("{}", report.ztunnel),
                        false => log::warn!("{}", report.ztunnel),
                    }
                    *last = report.ztunnel.clone();
                }
                drop(last);
                log::debug!(
                    "{} dataplane: {} pods captured",
                    dp.name(),
                    report.captured.len()
                );
                self.health.applied(&report);
                if let Some(f) = &self.on_applied {
                    f(report.captured.iter().cloned().collect());
                }
                // A ztunnel that is not listening yet is looked at again soon, not at the resync.
                let ok = report.failed.is_empty()
                    && !matches!(report.ztunnel, ZtunnelState::NotListening { .. });
                Applied {
                    ok,
                    held: Some(report.held.iter().copied().collect()),
                    captured: report.captured.into_iter().collect(),
                    failed: report
                        .failed
                        .into_iter()
                        .map(|(pod, e)| (pod, e.chain().to_string()))
                        .collect(),
                    node_error: None,
                }
            }
            Err(e) => {
                log::error!("{} dataplane: {}", dp.name(), e.chain());
                self.health.failed();
                Applied {
                    ok: false,
                    held: None,
                    captured: BTreeSet::new(),
                    failed: vec![],
                    node_error: Some(e.chain().to_string()),
                }
            }
        }
    }
}

/// What one apply achieved.
struct Applied {
    /// Nothing needs a retry.
    ok: bool,
    /// The veths still held, if the apply got that far.
    held: Option<BTreeSet<u32>>,
    captured: BTreeSet<PodId>,
    failed: Vec<(PodId, String)>,
    /// Why the apply failed as a whole, if it did.
    node_error: Option<String>,
}

impl Applied {
    /// Whether `pod` is captured, or why not.
    fn outcome_of(&self, pod: &PodId) -> Result<(), String> {
        if self.captured.contains(pod) {
            return Ok(());
        }
        if let Some(e) = &self.node_error {
            return Err(e.clone());
        }
        Err(self.failed.iter().find(|(p, _)| p == pod).map_or_else(
            || "not captured by the last apply".into(),
            |(_, why)| why.clone(),
        ))
    }
}
