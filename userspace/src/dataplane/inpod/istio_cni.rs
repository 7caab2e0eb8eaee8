//! istio-cni's in-pod redirection, for in-pod ztunnel, whose listeners are in the pod's own
//! netns. The rules are istio-cni's (its `cni/pkg/iptables`). ztunnel's
//! `scripts/ztunnel-redirect-inpod.sh` holds a reference copy of them. They are applied in the
//! pod's netns, one restore per family, together with the policy route that delivers replies
//! of ztunnel's original-source connections to its socket.
use std::path::Path;

use zdivert_common::{
    MARK_INPOD_CONN, MARK_INPOD_ZTUNNEL, MARK_MASK, PORT_DNS, PORT_DNS_PROXY, PORT_INBOUND_HBONE,
    PORT_INBOUND_PLAIN, PORT_OUTBOUND,
};

use super::routing::{route_replies, unroute_replies};
use crate::{
    dataplane::iptables::tables::{self, Backend},
    error::Result,
    netns,
    nl::Netlink,
};

/// The address the node SNATs kubelet probes to (istio-cni's `--ambient-snat`), per family.
pub const PROBE_SOURCE_V4: &str = "169.254.7.127";
pub const PROBE_SOURCE_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

const JUMPS: [(&str, &str, &str); 4] = [
    ("mangle", "PREROUTING", "ISTIO_PRERT"),
    ("mangle", "OUTPUT", "ISTIO_OUTPUT"),
    ("nat", "OUTPUT", "ISTIO_OUTPUT"),
    ("nat", "PREROUTING", "ISTIO_PRERT"),
];

/// The rules of one family as an `iptables-restore --noflush` input. Declaring our chains
/// flushes them, so a second restore replaces their rules; the jumps from the built-in chains
/// are written only where `present` says they are missing.
pub fn restore_input(
    v6: bool,
    dns_capture: bool,
    present: &dyn Fn(&str, &str, &str) -> bool,
) -> String {
    let (probe, lo, len) = if v6 {
        (PROBE_SOURCE_V6, "::1", 128)
    } else {
        (PROBE_SOURCE_V4, "127.0.0.1", 32)
    };
    let (zt, conn, mask) = (MARK_INPOD_ZTUNNEL, MARK_INPOD_CONN, MARK_MASK);
    let jumps = |table: &str| -> String {
        JUMPS
            .iter()
            .filter(|(t, chain, to)| *t == table && !present(t, chain, to))
            .map(|(_, chain, to)| format!("-A {chain} -j {to}\n"))
            .collect()
    };
    let mut s = String::from("*mangle\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_PRERT - [0:0]\n");
    s += &jumps("mangle");
    s += &format!(
        "-A ISTIO_OUTPUT -m connmark --mark {conn:#x}/{mask:#x} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n\
         -A ISTIO_PRERT -m mark --mark {zt:#x}/{mask:#x} -j CONNMARK --set-xmark {conn:#x}/{mask:#x}\n\
         COMMIT\n*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_PRERT - [0:0]\n"
    );
    s += &jumps("nat");
    s += &format!("-A ISTIO_OUTPUT -d {probe}/{len} -p tcp -m tcp -j ACCEPT\n");
    if dns_capture {
        s += &format!(
            "-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark {zt:#x}/{mask:#x} -m udp --dport {PORT_DNS} -j REDIRECT --to-ports {PORT_DNS_PROXY}\n\
             -A ISTIO_OUTPUT ! -d {lo}/{len} -p tcp -m tcp --dport {PORT_DNS} -m mark ! --mark {zt:#x}/{mask:#x} -j REDIRECT --to-ports {PORT_DNS_PROXY}\n"
        );
    }
    s += &format!(
        "-A ISTIO_OUTPUT -p tcp -m mark --mark {conn:#x}/{mask:#x} -j ACCEPT\n\
         -A ISTIO_OUTPUT ! -d {lo}/{len} -o lo -j ACCEPT\n\
         -A ISTIO_OUTPUT ! -d {lo}/{len} -p tcp -m mark ! --mark {zt:#x}/{mask:#x} -j REDIRECT --to-ports {PORT_OUTBOUND}\n\
         -A ISTIO_PRERT -s {probe}/{len} -p tcp -m tcp -j ACCEPT\n\
         -A ISTIO_PRERT ! -d {lo}/{len} -p tcp -m tcp ! --dport {PORT_INBOUND_HBONE} -m mark ! --mark {zt:#x}/{mask:#x} -j REDIRECT --to-ports {PORT_INBOUND_PLAIN}\n\
         COMMIT\n"
    );
    s
}

/// Applies the redirection in the netns at `pod_netns`, both families. Applying again
/// changes nothing. Returns how many of the rules' lines were not in the kernel before (all of
/// them the first time; after that, what was flushed or deleted behind the agent's back).
pub fn apply(pod_netns: &Path, backend: Backend, dns_capture: bool) -> Result<usize> {
    netns::run_in(pod_netns, || -> Result<usize> {
        let nl = Netlink::new()?;
        let mut missing = 0;
        for v6 in [false, true] {
            let saved = tables::save_all(backend, v6)?;
            let present = |table: &str, chain: &str, to: &str| {
                table_lines(&saved, table).any(|l| l == format!("-A {chain} -j {to}"))
            };
            let input = restore_input(v6, dns_capture, &present);
            let held: std::collections::BTreeSet<&str> =
                saved.lines().filter(|l| l.starts_with("-A ")).collect();
            missing += input
                .lines()
                .filter(|l| l.starts_with("-A ") && !held.contains(l))
                .count();
            tables::restore(backend, v6, &input)?;
            route_replies(&nl, v6)?;
        }
        Ok(missing)
    })?
}

/// Takes the redirection out of the netns at `pod_netns` (the pod left the mesh, or cleanup):
/// chains, jumps, the rule and the route; what is already gone is skipped.
pub fn remove(pod_netns: &Path, backend: Backend) -> Result<()> {
    let chains = JUMPS.map(|(table, from, to)| (table, to, from));
    netns::run_in(pod_netns, || -> Result<()> {
        let nl = Netlink::new()?;
        for v6 in [false, true] {
            tables::remove_chains(backend, v6, &chains)?;
            unroute_replies(&nl, v6)?;
        }
        Ok(())
    })?
}

/// The lines of one table in an `iptables-save` of all tables.
fn table_lines<'a>(save: &'a str, table: &str) -> impl Iterator<Item = &'a str> {
    let header = format!("*{table}");
    save.lines()
        .skip_while(move |l| *l != header)
        .take_while(|l| *l != "COMMIT")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of ztunnel's reference copy of istio-cni's in-pod rules, IPv4 with DNS, as
    /// `iptables-save` prints them (it adds the implicit `-m tcp` of `--dport`).
    const REFERENCE: &str = "\
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006";

    #[test]
    fn the_rules_are_istio_cnis_and_jumps_are_not_repeated() {
        let fresh = restore_input(false, true, &|_, _, _| false);
        let rules: Vec<&str> = fresh.lines().filter(|l| l.starts_with("-A")).collect();
        assert_eq!(rules, REFERENCE.lines().collect::<Vec<_>>());
        let again = restore_input(false, true, &|_, _, _| true);
        assert_eq!(
            again
                .lines()
                .filter(|l| l.starts_with("-A") && l.contains(" -j ISTIO_"))
                .count(),
            0
        );
        let v6 = restore_input(true, false, &|_, _, _| false);
        assert!(
            v6.contains("! -d ::1/128 -p tcp -m tcp ! --dport 15008"),
            "{v6}"
        );
        assert!(!v6.contains("--dport 53"), "{v6}");
    }
}
