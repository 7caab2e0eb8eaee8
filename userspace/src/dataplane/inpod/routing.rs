//! The policy route both in-pod redirections need in each pod's netns (istio-cni's): packets
//! marked 0x111 are delivered locally, whatever their destination.
use zdivert_common::{MARK_INPOD_CONN, MARK_MASK, ZTUNNEL_TPROXY_TABLE};

use crate::{
    error::Result,
    nl::{Netlink, PolicyRule, RuleTarget},
};

/// istio-cni's priority for the rule that routes marked replies to the local table.
pub const RULE_PRIORITY: u32 = 32764;

/// In the pod's netns (the caller is there): packets marked 0x111 are delivered locally,
/// whatever their destination. Both redirections need it: replies of ztunnel's original-source
/// connections, and (eBPF) the segments turned back to ztunnel.
pub fn route_replies(nl: &Netlink, v6: bool) -> Result<()> {
    nl.ensure_local_default(ZTUNNEL_TPROXY_TABLE, v6)?;
    nl.ensure_rule(reply_rule(), v6)
}

/// Undoes `route_replies`; what is already gone is skipped.
pub fn unroute_replies(nl: &Netlink, v6: bool) -> Result<()> {
    nl.remove_rule(reply_rule(), v6)?;
    nl.remove_local_default(ZTUNNEL_TPROXY_TABLE, v6)
}

fn reply_rule() -> PolicyRule {
    PolicyRule::fwmark(
        RULE_PRIORITY,
        MARK_INPOD_CONN,
        MARK_MASK,
        RuleTarget::Table(ZTUNNEL_TPROXY_TABLE),
    )
}
