//! ztunnel rollouts in in-pod mode (`zdivert_tests::rollout`): a workload making new
//! connections throughout must not see one fail. In eBPF mode every new connection goes to the
//! newest ztunnel that acked the pod (`zd_zt_newest`); istio-cni's rules leave the choice to
//! the kernel, and that test is ignored: run it with `--ignored` to measure.
use zdivert_tests::{agent::Mode, rollout};

const ROLLOUTS: usize = 5;

fn rollouts_fail_no_connection(mode: Mode) -> anyhow::Result<()> {
    let r = rollout::run(mode, ROLLOUTS, 0)?;
    let failed: Vec<String> = (r.requests.iter())
        .filter_map(|(r, _)| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    println!(
        "{mode:?}: {} connections across {ROLLOUTS} rollouts, {} failed; the old ztunnel logged \
         {:?} connections after the new one's ack",
        r.requests.len(),
        failed.len(),
        r.old_logged_after_ack
    );
    assert!(failed.is_empty(), "{mode:?}: {failed:?}");
    assert!(
        r.old_logged_after_ack.iter().all(|n| *n == 0),
        "{mode:?}: the old ztunnel was given new connections after the new one acked: {:?}",
        r.old_logged_after_ack
    );
    Ok(())
}

#[test]
fn ebpf_rollouts_fail_no_connection() -> anyhow::Result<()> {
    rollouts_fail_no_connection(Mode::InPodEbpf)
}

#[test]
#[ignore = "not zero: the kernel hashes new connections to either ztunnel, and one in about \
            5,000 meets the old one's closing listener or draining server, as istio/istio#58514 \
            reports for istio-cni; rules cannot choose the listener (README, issue 25)"]
fn iptables_rollouts_fail_no_connection() -> anyhow::Result<()> {
    rollouts_fail_no_connection(Mode::InPodIptables)
}
