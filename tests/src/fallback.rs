//! What the iptables fallback put into a simulated node, read back with the article's own
//! commands (`ipset list`, `iptables-save`, `ip rule`, `ip route show table N`, `ip -d link`).
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::topology::Node;

/// The article's commands, run on the node and in its ztunnel's netns, in IPv4 and IPv6.
#[derive(Debug, Default)]
pub struct Dump {
    pub node: String,
    pub ztunnel: String,
    pub node6: String,
    pub ztunnel6: String,
}

/// The article's commands; `ipset list` only applies to the node.
const COMMANDS: [(&str, &str); 8] = [
    ("ipset", "list"),
    ("iptables-save", ""),
    ("ip", "rule"),
    ("ip", "route show table 100"),
    ("ip", "route show table 101"),
    ("ip", "route show table 102"),
    ("ip", "-d link show"),
    ("ip", "addr"),
];

/// The same commands for the layout's IPv6 half.
const COMMANDS6: [(&str, &str); 7] = [
    ("ipset", "list ztunnel-pods-ips6"),
    ("ip6tables-save", ""),
    ("ip", "-6 rule"),
    ("ip", "-6 route show table 100"),
    ("ip", "-6 route show table 101"),
    ("ip", "-6 route show table 102"),
    ("ip", "-6 addr"),
];

fn run_all(ns: &crate::ns::Netns, commands: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (cmd, args) in commands {
        let args: Vec<&str> = args.split_whitespace().collect();
        out += &format!("### {cmd} {}\n", args.join(" "));
        out += &ns.cmd(cmd, &args).unwrap_or_else(|e| format!("({e})\n"));
    }
    out
}

impl Dump {
    pub fn take(node: &Node) -> Result<Dump> {
        Ok(Dump {
            node: run_all(&node.ns, &COMMANDS),
            ztunnel: run_all(&node.ztunnel.ns, &COMMANDS[1..]),
            node6: run_all(&node.ns, &COMMANDS6),
            ztunnel6: run_all(&node.ztunnel.ns, &COMMANDS6[1..]),
        })
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
    let deadline = Instant::now() + crate::SET_UP_WITHIN;
    let mut last = String::new();
    while Instant::now() < deadline {
        let members = ipset_members(node).len();
        // Both families: IPv6 is applied after IPv4.
        let zt = ["iptables-save", "ip6tables-save"].map(|save| {
            node.ztunnel
                .ns
                .cmd(save, &["-t", "mangle"])
                .unwrap_or_default()
                .matches("-j TPROXY")
                .count()
        });
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
        if members == pods
            && routes == pods
            && chains
            && zt.iter().all(|&n| (n == 3) == with_ztunnel)
        {
            return Ok(());
        }
        last = format!(
            "{members} ipset members, {routes} pod routes, {zt:?} TPROXY rules (v4, v6), nat chain {chains}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("fallback on {} not ready: {last}", node.name)
}

/// Packets that matched the rule containing `rule` (any table), from `iptables-save -c`.
pub fn rule_packets(ns: &crate::ns::Netns, rule: &str) -> Result<u64> {
    let save = ns.cmd("iptables-save", &["-c"])?;
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

/// The article's lines for `node` (docs/layout.md), with this node's veth names and addresses.
fn article_lines(node: &Node, tunnel: &str) -> (Vec<String>, Vec<String>) {
    let zveth = &node.ztunnel.host_veth;
    let (zip, host) = (node.ztunnel.ip, node.gateway);
    let mut n: Vec<String> = vec!["Name: ztunnel-pods-ips".into()];
    let mut pods: Vec<_> = node.pods.values().filter(|p| p.ambient).collect();
    pods.sort_by_key(|p| p.ip);
    for p in &pods {
        n.push(p.ip.to_string());
        n.push(format!("{} via 192.168.126.2 dev istioin src {host}", p.ip));
    }
    let pre = "-A ztunnel-PREROUTING";
    n.extend(
        [
            "-A PREROUTING -j ztunnel-PREROUTING".to_string(),
            format!("{pre} -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100"),
            format!("{pre} -m mark --mark 0x100/0x100 -j ACCEPT"),
            format!("{pre} -i istioin -j MARK --set-xmark 0x200/0x200"),
            format!("{pre} -i istioin -j RETURN"),
            format!("{pre} -i istioout -j MARK --set-xmark 0x200/0x200"),
            format!("{pre} -i istioout -j RETURN"),
            format!("{pre} -p udp -m udp --dport 6081 -j RETURN"),
            format!("{pre} -m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200"),
            format!("{pre} -m mark --mark 0x200/0x200 -j RETURN"),
            format!("{pre} ! -i {zveth} -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40"),
            format!("{pre} -m mark --mark 0x40/0x40 -j RETURN"),
            format!("{pre} ! -s {zip}/32 -i {zveth} -j MARK --set-xmark 0x210/0x210"),
            format!("{pre} -i {zveth} -j MARK --set-xmark 0x220/0x220"),
            format!("{pre} -p udp -j MARK --set-xmark 0x220/0x220"),
            "-A ztunnel-FORWARD -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220".into(),
            "-A ztunnel-FORWARD -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210".into(),
            "-A ztunnel-INPUT -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220".into(),
            "-A ztunnel-INPUT -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210".into(),
            format!("-A ztunnel-OUTPUT -s {host}/32 -j MARK --set-xmark 0x220/0xffffffff"),
            "-A FORWARD -j ztunnel-FORWARD".into(),
            "-A INPUT -j ztunnel-INPUT".into(),
            "-A OUTPUT -j ztunnel-OUTPUT".into(),
            "-A POSTROUTING -j ztunnel-POSTROUTING".into(),
            "-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT".into(),
            "100:\tfrom all fwmark 0x200/0x200 goto 32766".into(),
            "101:\tfrom all fwmark 0x100/0x100 lookup 101".into(),
            "102:\tfrom all fwmark 0x40/0x40 lookup 102".into(),
            "103:\tfrom all lookup 100".into(),
            format!("{zip} dev {zveth} scope link"),
            "default via 192.168.127.2 dev istioout".into(),
            format!("default via {zip} dev {zveth} onlink"),
            "inet 192.168.127.1/30 brd 192.168.127.3 scope global istioout".into(),
            "inet 192.168.126.1/30 brd 192.168.126.3 scope global istioin".into(),
        ],
    );
    let dev = |d: &str| {
        if tunnel == "vxlan" {
            format!("dev {d} ")
        } else {
            String::new()
        }
    };
    for (vni, name) in [(1000, "istioin"), (1001, "istioout")] {
        n.push(format!("{name}: <BROADCAST,MULTICAST,UP,LOWER_UP>"));
        n.push(format!("{tunnel} id {vni} remote {zip} {}", dev(zveth)));
    }
    let mut z: Vec<String> = vec![
        "-A PREROUTING -i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff".into(),
        "-A PREROUTING -i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff".into(),
        "-A PREROUTING -i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff".into(),
        format!("-A PREROUTING ! -d {zip}/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff"),
        "20000:\tfrom all fwmark 0x400/0xfff lookup 100".into(),
        "20003:\tfrom all fwmark 0x4d3/0xfff lookup 100".into(),
        "local default dev lo scope host".into(),
        "default via 192.168.127.1 dev pistioout".into(),
        "default via 192.168.126.1 dev pistioin".into(),
        format!("{host} dev eth0 scope link"),
        "inet 192.168.127.2/30 scope global pistioout".into(),
        "inet 192.168.126.2/30 scope global pistioin".into(),
    ];
    for (vni, name) in [(1000, "pistioin"), (1001, "pistioout")] {
        z.push(format!("{name}: <BROADCAST,MULTICAST,UP,LOWER_UP>"));
        z.push(format!("{tunnel} id {vni} remote {host} {}", dev("eth0")));
    }
    (n, z)
}

/// The IPv6 half of the layout (docs/design.md): the article's lines in ip6tables and `ip -6`
/// spelling, the tunnels addressed `fd00:192:168:12{6,7}::N/64`.
fn article_lines6(node: &Node) -> (Vec<String>, Vec<String>) {
    let zveth = &node.ztunnel.host_veth;
    let (zip, host) = (node.ztunnel.ip6, node.gateway6);
    let tail = "metric 1024 pref medium";
    let mut n: Vec<String> = vec!["Name: ztunnel-pods-ips6".into()];
    for p in node.pods.values().filter(|p| p.ambient) {
        n.push(p.ip6.to_string());
        n.push(format!(
            "{} via fd00:192:168:126::2 dev istioin src {host} {tail}",
            p.ip6
        ));
    }
    let pre = "-A ztunnel-PREROUTING";
    n.extend([
        "-A PREROUTING -j ztunnel-PREROUTING".to_string(),
        format!(
            "{pre} -p tcp -m set --match-set ztunnel-pods-ips6 src -j MARK --set-xmark 0x100/0x100"
        ),
        format!("{pre} -i istioin -j MARK --set-xmark 0x200/0x200"),
        format!("{pre} -i istioout -j MARK --set-xmark 0x200/0x200"),
        format!("{pre} ! -i {zveth} -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40"),
        format!("{pre} ! -s {zip}/128 -i {zveth} -j MARK --set-xmark 0x210/0x210"),
        format!("{pre} -i {zveth} -j MARK --set-xmark 0x220/0x220"),
        format!("{pre} -p ipv6-icmp -j MARK --set-xmark 0x220/0x220"),
        format!("-A ztunnel-OUTPUT -s {host}/128 -j MARK --set-xmark 0x220/0xffffffff"),
        "-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT".into(),
        "100:\tfrom all fwmark 0x200/0x200 goto 32766".into(),
        "101:\tfrom all fwmark 0x100/0x100 lookup 101".into(),
        "102:\tfrom all fwmark 0x40/0x40 lookup 102".into(),
        "103:\tfrom all lookup 100".into(),
        format!("{zip} dev {zveth} {tail}"),
        format!("default via fd00:192:168:127::2 dev istioout {tail}"),
        format!("default via {zip} dev {zveth} metric 1024 onlink pref medium"),
        "inet6 fd00:192:168:126::1/64 scope global nodad".into(),
        "inet6 fd00:192:168:127::1/64 scope global nodad".into(),
    ]);
    let z = vec![
        "-A PREROUTING -i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip ::1 --tproxy-mark 0x400/0xfff".into(),
        "-A PREROUTING -i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip ::1 --tproxy-mark 0x400/0xfff".into(),
        "-A PREROUTING -i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip ::1 --tproxy-mark 0x400/0xfff".into(),
        format!("-A PREROUTING ! -d {zip}/128 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff"),
        "20000:\tfrom all fwmark 0x400/0xfff lookup 100".into(),
        "20003:\tfrom all fwmark 0x4d3/0xfff lookup 100".into(),
        format!("local default dev lo {tail}"),
        format!("default via fd00:192:168:127::1 dev pistioout {tail}"),
        format!("default via fd00:192:168:126::1 dev pistioin {tail}"),
        format!("{host} dev eth0 {tail}"),
        "inet6 fd00:192:168:126::2/64 scope global nodad".into(),
        "inet6 fd00:192:168:127::2/64 scope global nodad".into(),
    ];
    (n, z)
}

/// The tunnels' link-local addresses must not be tentative: neighbour discovery on a tunnel
/// solicits from it, and a tentative one held the first IPv6 connection for ~2 s.
fn tunnels_link_local_ready(addrs: &str) {
    let mut link = "";
    for l in addrs.lines() {
        if let Some((_, rest)) = l.split_once(": ") {
            link = rest.split(':').next().unwrap_or("");
        } else if link.contains("istio") && l.contains("scope link") {
            assert!(!l.contains("tentative"), "{link}: {l}\n{addrs}");
        }
    }
}

/// Wanted lines that no output line is equal to, or (for the link lines, whose tails differ
/// between iproute2 versions and the header's index and MTU) begins with after its index.
pub fn missing(output: &str, wanted: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|w| {
            !output.lines().any(|l| {
                let l = l.trim();
                let unindexed = l.split_once(": ").map_or(l, |(_, rest)| rest);
                l == w.trim()
                    || (w.contains("id 10") && l.starts_with(w.as_str()))
                    || (w.ends_with('>') && unindexed.starts_with(w.as_str()))
            })
        })
        .cloned()
        .collect()
}

fn tunnel_tail_checks(dump: &str) {
    for l in dump.lines().filter(|l| l.contains(" id 100")) {
        for flag in ["dstport 6081", "noudpcsum", "udp6zerocsumrx"] {
            assert!(l.contains(flag), "tunnel line lacks {flag}: {l}");
        }
    }
}

pub fn sysctl_lines(node: &Node) -> (Vec<String>, Vec<String>) {
    let zveth = &node.ztunnel.host_veth;
    let mut n: Vec<String> = ["all", "default", zveth, "istioin", "istioout"]
        .iter()
        .map(|i| format!("{i}.rp_filter=0"))
        .collect();
    for p in node.pods.values().filter(|p| p.ambient) {
        n.push(format!("{}.rp_filter=0", p.host_veth));
    }
    for i in [zveth.as_str(), "istioin", "istioout"] {
        n.push(format!("{i}.accept_local=1"));
    }
    let z = ["all", "default", "eth0", "pistioin", "pistioout"]
        .iter()
        .map(|i| format!("{i}.rp_filter=0"))
        .collect();
    (n, z)
}

/// Asserts that every line the article shows is on `node` and in its ztunnel's netns, in IPv4
/// and in the layout's IPv6 spelling, with the tunnel flags the layout specifies.
pub fn assert_article_lines(node: &Node, tunnel: &str) -> Result<()> {
    let dump = Dump::take(node)?;
    let (want_node, want_zt) = article_lines(node, tunnel);
    let (want_node6, want_zt6) = article_lines6(node);
    for (side, out, want) in [
        ("node", &dump.node, want_node),
        ("ztunnel", &dump.ztunnel, want_zt),
        ("node (IPv6)", &dump.node6, want_node6),
        ("ztunnel (IPv6)", &dump.ztunnel6, want_zt6),
    ] {
        assert_eq!(missing(out, &want), Vec::<String>::new(), "{side}:\n{out}");
        tunnel_tail_checks(out);
    }
    tunnels_link_local_ready(&dump.node6);
    tunnels_link_local_ready(&dump.ztunnel6);
    Ok(())
}
