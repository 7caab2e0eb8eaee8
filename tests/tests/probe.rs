//! `zdivert probe`, as `--mode auto` decides: node-level eBPF runs on every kernel zdivert
//! supports (5.10 and later), and in-pod eBPF either runs or is refused for the one reason a
//! supported kernel may have (`bpf_sk_assign` of a SO_REUSEPORT listener, Linux 6.5+). Run on
//! this machine by `cargo xtask test` and on Debian's kernels by `cargo xtask vmtest`.
use zdivert_tests::{
    agent::zdivert_bin,
    ns::{Netns, unique_prefix},
    snapshot::{assert_same, snapshot},
};

#[test]
fn probe_finds_node_level_ebpf_usable_and_says_why_in_pod_is_not() -> anyhow::Result<()> {
    let ns = Netns::new(&unique_prefix("probe"))?;
    let before = snapshot(&ns)?;
    let pins_before = probe_pins();
    let out = ns.cmd(zdivert_bin().to_str().expect("utf-8 path"), &["probe"])?;
    println!("{out}");
    let line = |mode: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{mode} eBPF: ")))
            .unwrap_or_else(|| panic!("no verdict for {mode}:\n{out}"))
            .to_string()
    };
    assert!(
        line("node-level").starts_with("node-level eBPF: usable"),
        "every node-level program loads and attaches on a supported kernel:\n{out}"
    );
    let in_pod = line("in-pod");
    assert!(
        in_pod.starts_with("in-pod eBPF: usable")
            || in_pod.starts_with(
                "in-pod eBPF: not usable: bpf_sk_assign does not take a SO_REUSEPORT listener"
            ),
        "in-pod eBPF runs, or is refused only for the SO_REUSEPORT assignment, with the plain \
         listener as its control:\n{out}"
    );
    assert_same(&before, &snapshot(&ns)?, "the probe's netns");
    assert_eq!(probe_pins(), pins_before, "the probe leaves no pins");
    Ok(())
}

/// A probe killed halfway (an agent SIGKILLed while `--mode auto` or in-pod `--mode ebpf`
/// probes, as the in-pod suites do) leaves its scratch pins and veth, named by its pid: the next
/// probe removes those of a pid that no longer runs.
#[test]
fn probe_removes_what_a_killed_probe_left() -> anyhow::Result<()> {
    let ns = Netns::new(&unique_prefix("probek"))?;
    // Above pid_max (2^22): no process has it.
    let dead = 9_999_999;
    let base = std::path::Path::new(zdivert_common::BPFFS).join(zdivert_common::PIN_BASE);
    let stale = base.join(format!("probe-{dead}"));
    std::fs::create_dir_all(&stale)?;
    ns.ip(&format!(
        "link add zdprobe{dead} type veth peer name zdprobe{dead}p"
    ))?;
    ns.cmd(zdivert_bin().to_str().expect("utf-8 path"), &["probe"])?;
    let links = ns.ip("-o link show")?;
    let left = stale.exists();
    let _ = std::fs::remove_dir(&stale);
    let _ = std::fs::remove_dir(&base);
    assert!(!left, "the dead probe's pins are removed");
    assert!(
        !links.contains("zdprobe"),
        "the dead probe's veth is removed:\n{links}"
    );
    Ok(())
}

/// The probe's scratch pins (`<bpffs>/zdivert/probe-<pid>`).
fn probe_pins() -> Vec<String> {
    let base = std::path::Path::new(zdivert_common::BPFFS).join(zdivert_common::PIN_BASE);
    let mut names: Vec<String> = std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("probe-"))
        .collect();
    names.sort();
    names
}
