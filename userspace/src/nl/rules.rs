//! Policy routing rules (`ip rule`): the eBPF mode's tproxy rule in ztunnel's netns and the
//! fallback's rules 100–103 and 20000/20003.
use futures::TryStreamExt as _;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::IpVersion;

use super::{Netlink, nl_err};
use crate::error::Result;

/// What a matching packet does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleTarget {
    /// `lookup <table>`
    Table(u32),
    /// `goto <priority>`
    Goto(u32),
}

/// `priority: from all [fwmark mark/mask] (lookup table | goto priority)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    pub priority: u32,
    pub fwmark: Option<(u32, u32)>,
    pub target: RuleTarget,
}

impl PolicyRule {
    pub const fn fwmark(priority: u32, mark: u32, mask: u32, target: RuleTarget) -> Self {
        PolicyRule {
            priority,
            fwmark: Some((mark, mask)),
            target,
        }
    }

    fn describe(&self) -> String {
        match self.fwmark {
            Some((m, k)) => format!("rule {} fwmark {m:#x}/{k:#x}", self.priority),
            None => format!("rule {}", self.priority),
        }
    }
}

impl Netlink {
    fn rule_messages(&self, v6: bool) -> Result<Vec<RuleMessage>> {
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        self.rt
            .block_on(async {
                self.handle
                    .rule()
                    .get(version)
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(nl_err("rule dump"))
    }

    /// The rules this crate can express (others, like the default ones, are left out).
    pub fn policy_rules(&self, v6: bool) -> Result<Vec<PolicyRule>> {
        Ok(self
            .rule_messages(v6)?
            .iter()
            .filter_map(to_policy_rule)
            .collect())
    }

    /// Adds the rule unless an identical one exists.
    pub fn ensure_rule(&self, rule: PolicyRule, v6: bool) -> Result<()> {
        if self.policy_rules(v6)?.contains(&rule) {
            return Ok(());
        }
        self.rt
            .block_on(async {
                let mut req = self.handle.rule().add().priority(rule.priority);
                if let Some((mark, _)) = rule.fwmark {
                    req = req.fw_mark(mark);
                }
                req = match rule.target {
                    RuleTarget::Table(t) => req.table_id(t).action(RuleAction::ToTable),
                    RuleTarget::Goto(_) => req.action(RuleAction::Goto),
                };
                let attrs = &mut req.message_mut().attributes;
                if let Some((_, mask)) = rule.fwmark {
                    attrs.push(RuleAttribute::FwMask(mask));
                }
                if let RuleTarget::Goto(p) = rule.target {
                    attrs.push(RuleAttribute::Goto(p));
                    // No table: `ip rule` would print a stray `lookup main`.
                    req.message_mut().header.table = 0;
                }
                if v6 {
                    req.v6().execute().await
                } else {
                    req.v4().execute().await
                }
            })
            .map_err(nl_err(rule.describe()))
    }

    /// Deletes every rule equal to `rule`; a missing one is not an error.
    pub fn remove_rule(&self, rule: PolicyRule, v6: bool) -> Result<()> {
        let msgs = self.rule_messages(v6)?;
        for m in msgs.into_iter().filter(|m| to_policy_rule(m) == Some(rule)) {
            self.rt
                .block_on(self.handle.rule().del(m).execute())
                .map_err(nl_err(format!("deleting {}", rule.describe())))?;
        }
        Ok(())
    }
}

fn to_policy_rule(m: &RuleMessage) -> Option<PolicyRule> {
    let (mut priority, mut mark, mut mask, mut table, mut goto) =
        (None, None, None, m.header.table as u32, None);
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = Some(*p),
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = Some(*v),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Goto(p) => goto = Some(*p),
            _ => {}
        }
    }
    let target = match m.header.action {
        RuleAction::ToTable => RuleTarget::Table(table),
        RuleAction::Goto => RuleTarget::Goto(goto?),
        _ => return None,
    };
    Some(PolicyRule {
        priority: priority.unwrap_or(0),
        fwmark: mark.map(|m| (m, mask.unwrap_or(u32::MAX))),
        target,
    })
}
