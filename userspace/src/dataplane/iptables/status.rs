//! `zdivert status` in fallback mode: what `dataplane::iptables::inspect` found, rendered.
use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use super::inspect::{self, Inspection};
use crate::error::Result;

#[derive(Debug, Serialize)]
pub struct Status {
    pub node: String,
    #[serde(flatten)]
    pub found: Inspection,
    /// Rules the last apply made that are not in the kernel now.
    pub missing_rules: usize,
}

pub fn read(state_dir: &Path, node: &str) -> Result<Status> {
    let found = inspect::inspect(state_dir, node)?;
    let missing_rules = found.rules.iter().filter(|r| r.packets.is_none()).count();
    Ok(Status {
        node: node.into(),
        found,
        missing_rules,
    })
}

impl Status {
    pub fn render(&self) -> String {
        let f = &self.found;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "node {}, mode iptables (state in {})",
            self.node,
            f.state_file.display()
        );
        if let Some(why) = &f.chosen_because {
            let _ = writeln!(s, "  chosen because: {why}");
        }
        let backend = f
            .backend
            .map_or("?".into(), |b| format!("{b:?}").to_lowercase());
        let _ = writeln!(s, "  iptables backend: {backend}");
        match &f.ztunnel_netns {
            Some((path, true)) => {
                let _ = writeln!(s, "ztunnel netns: {}", path.display());
            }
            Some((path, false)) => {
                let _ = writeln!(s, "ztunnel netns: {} (gone)", path.display());
            }
            None => {
                let _ = writeln!(
                    s,
                    "ztunnel: none (ambient pods' TCP is dropped: fail closed)"
                );
            }
        }
        let _ = writeln!(
            s,
            "tunnels: {} on UDP {}",
            f.tunnel.as_deref().unwrap_or("?"),
            f.tunnel_port.map_or("?".into(), |p| p.to_string())
        );
        for l in &f.tunnel_links {
            let state = if l.present { "present" } else { "MISSING" };
            let _ = writeln!(s, "  {:<10} in the {} netns: {state}", l.name, l.netns);
        }
        let _ = writeln!(s, "ipsets:");
        for set in &f.ipsets {
            match &set.members {
                Some(m) => {
                    let _ = writeln!(s, "  {} ({}): {}", set.name, m.len(), m.join(" "));
                }
                None => {
                    let _ = writeln!(s, "  {}: absent", set.name);
                }
            }
        }
        let _ = writeln!(
            s,
            "rules ({}, {} missing), packets:",
            f.rules.len(),
            self.missing_rules
        );
        for r in &f.rules {
            let family = if r.rule.v6 { "ip6" } else { "ip4" };
            let packets = r.packets.map_or("MISSING".into(), |p| p.to_string());
            let _ = writeln!(
                s,
                "  {:>10}  {} {} {:<7} {}",
                packets, r.rule.netns, family, r.rule.table, r.rule.rule
            );
        }
        s
    }
}
