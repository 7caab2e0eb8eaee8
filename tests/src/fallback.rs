//! What the iptables fallback put into a simulated node, read back with the article's own
//! commands (`ipset list`, `iptables-save`, `ip rule`, `ip route show table N`, `ip -d link`).
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::topology::Node;

/// The article's commands, run on the node and in its ztunnel's netns.
#[derive(Debug, Default)]
pub struct Dump {
    pub node: String,
    pub ztunnel: String,
}

impl Dump {
    pub fn take(node: &Node) -> Result<Dump> {
        let mut d = Dump::default();
        for (cmd, args) in [
            ("ipset", "list"),
            ("iptables-save", ""),
            ("ip", "rule"),
            ("ip", "route show table 100"),
            ("ip", "route show table 101"),
            ("ip", "route show table 102"),
            ("ip", "-d link show"),
            ("ip", "addr"),
        ] {
            let args: Vec<&str> = args.split_whitespace().collect();
            d.node += &format!("### {cmd} {}\n", args.join(" "));
            d.node += &node
                .ns
                .cmd(cmd, &args)
                .unwrap_or_else(|e| format!("({e})\n"));
        }
        for (cmd, args) in [
            ("iptables-save", ""),
            ("ip", "rule"),
            ("ip", "route show table 100"),
            ("ip", "route show table 101"),
            ("ip", "route show table 102"),
            ("ip", "-d link show"),
            ("ip", "addr"),
        ] {
            let args: Vec<&str> = args.split_whitespace().collect();
            d.ztunnel += &format!("### {cmd} {}\n", args.join(" "));
            d.ztunnel += &node
                .ztunnel
                .ns
                .cmd(cmd, &args)
                .unwrap_or_else(|e| format!("({e})\n"));
        }
        Ok(d)
    }

    /// Lines of `text` that no line of `output` contains (compared with whitespace trimmed).
    pub fn missing<'a>(output: &str, lines: &'a [String]) -> Vec<&'a String> {
        lines
            .iter()
            .filter(|want| !output.lines().any(|l| l.trim() == want.trim()))
            .collect()
    }
}

/// Members of the node's `ztunnel-pods-ips` set.
pub fn ipset_members(node: &Node) -> Vec<String> {
    node.ns
        .cmd("ipset", &["save", "ztunnel-pods-ips"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("add ztunnel-pods-ips "))
        .map(str::to_string)
        .collect()
}

/// Waits until the fallback captures `pods` pods on `node` and, if `with_ztunnel`, ztunnel's
/// TPROXY rules are in place.
pub fn wait_layout(node: &Node, pods: usize, with_ztunnel: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        let members = ipset_members(node).len();
        let zt = node
            .ztunnel
            .ns
            .cmd("iptables-save", &["-t", "mangle"])
            .unwrap_or_default()
            .matches("-j TPROXY")
            .count();
        let chains = node
            .ns
            .cmd("iptables-save", &["-t", "nat"])
            .unwrap_or_default()
            .contains("-A ztunnel-PREROUTING");
        let table100 = node.ns.ip("route show table 100").unwrap_or_default();
        let routes = table100
            .lines()
            .filter(|l| {
                if with_ztunnel {
                    l.contains("dev istioin")
                } else {
                    l.starts_with("blackhole")
                }
            })
            .count();
        if members == pods && routes == pods && chains && (zt == 3) == with_ztunnel {
            return Ok(());
        }
        last = format!(
            "{members} ipset members, {routes} pod routes, {zt} TPROXY rules, nat chain {chains}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("fallback on {} not ready: {last}", node.name)
}

/// Packets that matched the mangle rule containing `rule`, from `iptables-save -c`.
pub fn rule_packets(ns: &crate::ns::Netns, rule: &str) -> Result<u64> {
    let save = ns.cmd("iptables-save", &["-c", "-t", "mangle"])?;
    let line = save
        .lines()
        .find(|l| l.contains(rule))
        .ok_or_else(|| anyhow::anyhow!("no rule containing {rule:?} in {}", ns.name))?;
    let packets = line
        .strip_prefix('[')
        .and_then(|l| l.split(':').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no counters on {line:?}"))?;
    Ok(packets)
}
