//! The fallback's part of the pod start window (its rules are always in place and match the
//! `zdivert-held` sets, so holding a veth is one `ipset add`), and the record of what each apply
//! made, for `zdivert status`.
use std::collections::BTreeSet;

use super::{
    IptablesDataplane,
    apply::{self, Families},
    ipset, layout, saved,
    tables::{self, Backend},
};
use crate::error::Result;

impl IptablesDataplane {
    /// The hold's chains and sets, before any veth can need them.
    pub(super) fn install_hold(backend: Backend) -> Result<()> {
        for (set, kind, _) in layout::hold_members(&[]) {
            if ipset::members(set)?.is_none() {
                ipset::sync(set, kind, &BTreeSet::new())?;
            }
        }
        for v6 in [false, true] {
            tables::sync_chains(backend, v6, &layout::hold_chains(v6))?;
        }
        Ok(())
    }

    /// Notes the rules this apply made (with `f`, the layout's; always the hold's).
    pub(super) fn record_applied(&mut self, f: Option<&Families>) -> Result<()> {
        let mut chains: Vec<(bool, layout::Chain)> = vec![];
        if let Some(f) = f {
            chains.extend(layout::node_chains(f.v4).into_iter().map(|c| (false, c)));
            chains.extend(apply::node_chains6(f).into_iter().map(|c| (true, c)));
        }
        for v6 in [false, true] {
            chains.extend(layout::hold_chains(v6).into_iter().map(|c| (v6, c)));
        }
        let node = |v6: bool, table: &str, rule: &str| saved::AppliedRule {
            netns: "node".into(),
            v6,
            table: table.into(),
            rule: rule.into(),
        };
        let mut applied: Vec<saved::AppliedRule> = chains
            .iter()
            .flat_map(|(v6, c)| c.rules.iter().map(move |r| node(*v6, c.table, r)))
            .collect();
        let ztunnels = f
            .into_iter()
            .flat_map(|f| [Some(f.v4), f.v6])
            .flatten()
            .filter_map(|p| p.ztunnel.as_ref());
        for z in ztunnels {
            applied.extend(
                layout::ztunnel_rules(z)
                    .into_iter()
                    .map(|rule| saved::AppliedRule {
                        netns: "ztunnel".into(),
                        v6: z.ip.is_ipv6(),
                        table: "mangle".into(),
                        rule,
                    }),
            );
        }
        if self.saved.applied != applied {
            self.saved.applied = applied;
            self.file.store(&self.saved)?;
        }
        Ok(())
    }

    pub(super) fn held_names(&self) -> Result<BTreeSet<String>> {
        Ok(ipset::members(layout::HOLD_SET)?
            .unwrap_or_default()
            .iter()
            .filter_map(|m| layout::held_name(m).map(str::to_string))
            .collect())
    }

    pub(super) fn sync_holds(&self, names: &[String]) -> Result<()> {
        for (set, kind, want) in layout::hold_members(names) {
            ipset::sync(set, kind, &want)?;
        }
        Ok(())
    }
}
