//! Everything zdivert could change in a netns, as text, to prove that cleanup (or a switch of
//! mode) leaves a node exactly as it found it.
use aya::programs::{SchedClassifier, TcAttachType};

use crate::ns::Netns;

/// An `iptables-save` without timestamps and without tables that hold nothing (no rule, no
/// user chain, every policy ACCEPT): iptables-nft creates those on first use and they filter
/// nothing, so they count as absent.
fn without_empty_tables(save: &str) -> String {
    let mut out = String::new();
    let mut block: Vec<&str> = Vec::new();
    for l in save.lines().filter(|l| !l.starts_with('#')) {
        block.push(l);
        if l == "COMMIT" {
            let empty = block[1..block.len() - 1]
                .iter()
                .all(|l| l.starts_with(':') && l.contains(" ACCEPT [") && !l.contains('-'));
            if !empty {
                out += &block.join("\n");
                out.push('\n');
            }
            block.clear();
        }
    }
    out
}

/// The iptables and ip6tables tables that exist in `ns`, as a plain save lists them (a save with
/// `-t` would create the table it names).
pub fn tables(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for cmd in ["iptables-save", "ip6tables-save"] {
        let save = ns.cmd(cmd, &[])?;
        out.extend(
            save.lines()
                .filter_map(|l| l.strip_prefix('*'))
                .map(|t| format!("{cmd} {t}")),
        );
    }
    Ok(out)
}

/// `rp_filter` and `accept_local` of every interface (and all/default) of `ns`.
pub fn sysctls(ns: &Netns) -> anyhow::Result<String> {
    ns.exec(|| -> anyhow::Result<String> {
        let mut out = String::new();
        let mut ifaces: Vec<String> = std::fs::read_dir("/proc/sys/net/ipv4/conf")?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ifaces.sort();
        for i in ifaces {
            for key in ["rp_filter", "accept_local"] {
                let v = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{i}/{key}"))?;
                out += &format!("{i}.{key}={}\n", v.trim());
            }
        }
        Ok(out)
    })
}

/// What zdivert could have changed in a netns: links, TCX/clsact attachments, rules, routes.
pub fn snapshot(ns: &Netns) -> anyhow::Result<String> {
    let mut s = String::new();
    for args in [
        "-d link show",
        "rule show",
        "-6 rule show",
        "route show table all",
        "-6 route show table all",
    ] {
        // IPv6 link-local routes appear when duplicate address detection ends: kernel timing,
        // not something zdivert does.
        // Routes are sorted: the kernel lists equal-metric routes of one prefix (ff00::/8 of every
        // device) in insertion order, which means nothing to the lookup.
        let out = ns.ip(args)?;
        let mut stable: Vec<&str> = out.lines().filter(|l| !l.contains("fe80::")).collect();
        if args.contains("route") {
            stable.sort_unstable();
        }
        s += &format!("## ip {args}\n{}\n", stable.join("\n"));
    }
    for (cmd, args) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[][..]),
        ("ipset", &["list"][..]),
    ] {
        let out = ns.cmd(cmd, args)?;
        s += &format!("## {cmd}\n{}\n", without_empty_tables(&out));
    }
    s += &format!("## sysctl\n{}", sysctls(ns)?);
    s += &format!("## tcx\n{}", tcx_programs(ns)?);
    s += &format!("## tc clsact\n{}", clsact_filters(ns)?);
    Ok(s)
}

fn interfaces(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let links = ns.ip("-o link show")?;
    Ok(links
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_string())
        })
        .collect())
}

/// The qdiscs of `ns` and the filters on every interface's clsact hooks, as `tc` shows them.
pub fn clsact_filters(ns: &Netns) -> anyhow::Result<String> {
    let mut out = ns.cmd("tc", &["qdisc", "show"])?;
    for name in interfaces(ns)? {
        for dir in ["ingress", "egress"] {
            let f = ns.cmd("tc", &["filter", "show", "dev", &name, dir])?;
            if !f.trim().is_empty() {
                out += &format!("{name} {dir}:\n{f}");
            }
        }
    }
    Ok(out)
}

/// The programs attached through TCX to every interface of `ns`, as the kernel reports them
/// (this bpftool predates TCX and shows nothing).
pub fn tcx_programs(ns: &Netns) -> anyhow::Result<String> {
    let names = interfaces(ns)?;
    ns.exec(move || -> anyhow::Result<String> {
        let mut out = String::new();
        for name in names {
            for (dir, ty) in [
                ("ingress", TcAttachType::Ingress),
                ("egress", TcAttachType::Egress),
            ] {
                let progs = match SchedClassifier::query_tcx(&name, ty) {
                    Ok((_, progs)) => progs,
                    // A kernel before 6.6 knows no TCX attach type (EINVAL): nothing can be
                    // attached through it there.
                    Err(e) if errno(&e) == Some(libc::EINVAL) => {
                        out += &format!("{name} {dir}: no TCX in this kernel\n");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let progs: Vec<String> = progs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_string())
                    .collect();
                out += &format!("{name} {dir}: {}\n", progs.join(" "));
            }
        }
        Ok(out)
    })
}

/// The errno at the bottom of an error's chain, if it is an OS error.
/// The OS error at the bottom of `e`'s chain, if any.
pub fn errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

pub fn pins(node: &str) -> Vec<String> {
    let root = std::path::Path::new(zdivert_common::PIN_ROOT).join(node);
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            out.push(e.path().display().to_string());
            stack.push(e.path());
        }
    }
    out
}

/// Asserts two snapshots are equal. On failure it shows the lines that differ, each under its
/// `##` section and counted, so a line that moved or doubled shows as well as one that changed.
pub fn assert_same(before: &str, after: &str, what: &str) {
    if before == after {
        return;
    }
    let counted = |s: &str| {
        let mut section = "";
        let mut lines: std::collections::BTreeMap<String, usize> = Default::default();
        for l in s.lines() {
            if l.starts_with("## ") {
                section = l;
            }
            *lines.entry(format!("{section} | {l}")).or_default() += 1;
        }
        lines
    };
    let (b, a) = (counted(before), counted(after));
    let differ = |x: &std::collections::BTreeMap<String, usize>,
                  y: &std::collections::BTreeMap<String, usize>| {
        x.iter()
            .filter(|(l, n)| y.get(*l) != Some(n))
            .map(|(l, n)| format!("{n}× {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let sections = |s: &str| -> Vec<String> { s.split("\n## ").map(str::to_string).collect() };
    let moved: Vec<String> = sections(before)
        .into_iter()
        .zip(sections(after))
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("=== before:\n{x}\n=== after:\n{y}"))
        .collect();
    panic!(
        "{what} changed\n--- only before:\n{}\n+++ only after:\n{}\n{}",
        differ(&b, &a),
        differ(&a, &b),
        moved.join("\n")
    );
}
