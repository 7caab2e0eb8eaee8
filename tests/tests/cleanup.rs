//! `zdivert cleanup` leaves both namespaces of a node and bpffs exactly as they were, even after
//! the agent was SIGKILLed (so it had no chance to clean up itself).
mod common;

use zdivert_tests::{
    agent::{Agent, Mode},
    snapshot::{assert_same, pins, snapshot},
    topology::Topology,
};

#[test]
fn cleanup_after_sigkill_restores_both_namespaces_and_bpffs() -> anyhow::Result<()> {
    after_sigkill(Mode::Ebpf)
}

/// Filters cannot be pinned: cleanup finds them from the recorded programs, in both namespaces,
/// and removes the clsact qdiscs it leaves empty.
#[test]
fn cleanup_after_sigkill_in_clsact_mode_restores_both_namespaces_and_bpffs() -> anyhow::Result<()> {
    after_sigkill(Mode::EbpfClsact)
}

fn after_sigkill(mode: Mode) -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let before = (snapshot(&node.ns)?, snapshot(&node.ztunnel.ns)?);

    let mut agent = Agent::start_mode(node, &node.pods_file(true), mode)?;
    let (a, l) = common::expected(node, true);
    agent.wait_ready(a * 2, l)?;
    let during = (snapshot(&node.ns)?, snapshot(&node.ztunnel.ns)?);
    assert_ne!(
        during.0, before.0,
        "the agent attached programs on the node"
    );
    assert!(
        during.1.contains("20000:") && during.1.contains("fwmark 0x400/0xfff lookup 100"),
        "{}",
        during.1
    );
    assert!(
        during.1.contains("local default dev lo table 100"),
        "{}",
        during.1
    );
    let maps = zdivert::dataplane::ebpf::maps::ALL.len();
    assert_eq!(
        pins(&agent.node).len(),
        3 + maps + l + 1,
        "maps/, links/, filters/, {maps} maps, {l} attachments, the sk_lookup link"
    );
    if mode == Mode::EbpfClsact {
        assert!(during.1.contains("zd_zt_tproxy"), "{}", during.1);
    }

    agent.kill();
    // Pinned state survives the agent: still attached.
    assert_eq!(snapshot(&node.ns)?, during.0);
    let out = agent.cleanup()?;
    assert!(
        out.contains(&format!(
            "removed {} links, {maps} maps, tproxy routing in 1 ztunnel netns",
            l + 1
        )),
        "{out}"
    );

    assert_same(&before.0, &snapshot(&node.ns)?, "the node");
    assert_same(&before.1, &snapshot(&node.ztunnel.ns)?, "ztunnel's netns");
    assert!(pins(&agent.node).is_empty(), "{:?}", pins(&agent.node));
    assert!(
        !std::path::Path::new(zdivert_common::PIN_ROOT)
            .join(&agent.node)
            .exists()
    );
    Ok(())
}
