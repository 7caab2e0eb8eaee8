//! ztunnel rollouts in in-pod mode (`zdivert_tests::rollout`): the new connections of four
//! streams across surge rollouts that failed or stalled (longer than a second: a SYN
//! retransmission), per rollout, eBPF against istio-cni's rules, at least `min_requests`
//! connections each.
use anyhow::Result;
use zdivert_tests::{agent::Mode, rollout};

use crate::stats::Samples;

const ROLLOUTS: usize = 5;

pub fn run(rounds: usize, min_requests: usize, samples: &mut Samples) -> Result<()> {
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::InPodEbpf, Mode::InPodIptables]
        } else {
            [Mode::InPodIptables, Mode::InPodEbpf]
        };
        for mode in order {
            let r = rollout::run(mode, ROLLOUTS, min_requests)?;
            let rollouts = r.old_logged_after_ack.len() as f64;
            let failed = r.requests.iter().filter(|(o, _)| o.is_err()).count();
            let stalled = (r.requests.iter())
                .filter(|(o, took)| o.is_ok() && took.as_secs_f64() > 1.0)
                .count();
            let old_logged: usize = r.old_logged_after_ack.iter().sum();
            let case = format!("ztunnel-rollout/{mode}");
            let mut add = |metric: &'static str, value: f64| {
                samples.add("rollout", &case, metric, "conn", value);
            };
            add("failed_per_rollout", failed as f64 / rollouts);
            add("stalled_per_rollout", stalled as f64 / rollouts);
            add(
                "old_logged_after_ack_per_rollout",
                old_logged as f64 / rollouts,
            );
            add("rollouts", rollouts);
            add("total", r.requests.len() as f64);
            eprintln!(
                "bench: ztunnel rollouts round {} {mode}: {failed} failed, {stalled} stalled of {}",
                round + 1,
                r.requests.len()
            );
        }
    }
    Ok(())
}
