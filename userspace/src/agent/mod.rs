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
    dataplane::Dataplane,
    state::{NodeState, PodId},
};

pub mod file;
pub mod health;

use health::Health;

/// How soon a failed apply is retried.
const RETRY: Duration = Duration::from_secs(1);
/// How often the stop flag is looked at while nothing happens.
const TICK: Duration = Duration::from_millis(200);

pub struct Reconciler {
    pub resync: Duration,
    /// Quiet time after a change before applying: a burst of API events becomes one apply.
    pub debounce: Duration,
    pub health: Arc<Health>,
    /// Told which pods are captured after every successful apply (the status annotation).
    pub on_applied: Option<Box<dyn Fn(BTreeSet<PodId>) + Send>>,
}

impl Reconciler {
    pub fn run(&self, dp: &mut dyn Dataplane, states: Receiver<NodeState>, stop: &AtomicBool) {
        let mut desired: Option<NodeState> = None;
        let mut due: Option<Instant> = None;
        // A burst that never quiets down is still applied this long after it started.
        let mut first_change: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let wait = due.map_or(TICK, |d| {
                d.saturating_duration_since(Instant::now()).min(TICK)
            });
            match states.recv_timeout(wait) {
                Ok(state) => {
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
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The source is gone (the agent is stopping); the kernel keeps its state.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.health.beat();
            let Some(state) = &desired else { continue };
            if due.is_some_and(|d| Instant::now() < d) {
                continue;
            }
            first_change = None;
            let ok = self.apply(dp, state);
            due = Some(Instant::now() + if ok { self.resync } else { RETRY });
        }
    }

    /// Applies `state` and logs the outcome; false if anything needs a retry.
    fn apply(&self, dp: &mut dyn Dataplane, state: &NodeState) -> bool {
        match dp.apply(state) {
            Ok(report) => {
                for (pod, e) in &report.failed {
                    log::warn!("{pod}: {e}");
                }
                if !report.ztunnel_ready {
                    log::warn!(
                        "no usable ztunnel: ambient pods' TCP is dropped until one is ready"
                    );
                }
                log::debug!(
                    "{} dataplane: {} pods captured",
                    dp.name(),
                    report.captured.len()
                );
                self.health.applied(&report);
                if let Some(f) = &self.on_applied {
                    f(report.captured.iter().cloned().collect());
                }
                report.failed.is_empty()
            }
            Err(e) => {
                log::error!("{} dataplane: {e}", dp.name());
                self.health.failed();
                false
            }
        }
    }
}
