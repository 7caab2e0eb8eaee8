//! iptables through `iptables-save` / `iptables-restore --noflush`: each change is one restore
//! transaction that touches only our chains (and the jumps into them), and nothing is restored
//! when the kernel already holds exactly what we want.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use super::layout::Chain;
use crate::error::{Error, Result};

/// Which iptables the node uses. Mixing them breaks kube-proxy's rules, so we follow the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn command(self, v6: bool, what: &str) -> String {
        let kind = match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        };
        let family = if v6 { "ip6" } else { "ip" };
        format!("{family}tables-{kind}-{what}")
    }
}

/// kube-proxy's iptables-wrapper rule: the kubelet's canary chains say which backend the node's
/// Kubernetes uses; failing that, the backend holding more rules wins, nft on a tie.
pub fn choose_backend(nft_save: &str, legacy_save: &str) -> (Backend, &'static str) {
    let canary = |save: &str| {
        save.lines()
            .any(|l| l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY"))
    };
    let rules = |save: &str| save.lines().filter(|l| l.starts_with('-')).count();
    if canary(nft_save) {
        (Backend::Nft, "the kubelet's canary chain is in nft")
    } else if canary(legacy_save) {
        (Backend::Legacy, "the kubelet's canary chain is in legacy")
    } else if rules(legacy_save) > rules(nft_save) {
        (Backend::Legacy, "legacy holds more rules")
    } else {
        (Backend::Nft, "nft holds at least as many rules (default)")
    }
}

pub(super) fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let command = || format!("{cmd} {}", args.join(" "));
    let fail = |source| Error::CommandSpawn {
        command: command(),
        source,
    };
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(fail)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        pipe.write_all(input.as_bytes()).map_err(fail)?;
    }
    let out = child.wait_with_output().map_err(fail)?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Some(input) = stdin {
            stderr += &format!("\ninput was:\n{input}");
        }
        return Err(Error::CommandFailed {
            command: command(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Detects the backend in the calling thread's netns.
pub fn detect() -> (Backend, &'static str) {
    let save = |b: Backend| {
        [false, true]
            .map(|v6| run(&b.command(v6, "save"), &[], None).unwrap_or_default())
            .concat()
    };
    choose_backend(&save(Backend::Nft), &save(Backend::Legacy))
}

pub fn save(backend: Backend, v6: bool, table: &str) -> Result<String> {
    run(&backend.command(v6, "save"), &["-t", table], None)
}

/// Every table of one family that exists, without creating any (`-t` would).
pub fn save_all(backend: Backend, v6: bool) -> Result<String> {
    run(&backend.command(v6, "save"), &[], None)
}

/// As `save`, every rule with its counters (`[packets:bytes] -A …`).
pub fn save_counted(backend: Backend, v6: bool, table: &str) -> Result<String> {
    run(&backend.command(v6, "save"), &["-c", "-t", table], None)
}

pub(crate) fn restore(backend: Backend, v6: bool, input: &str) -> Result<()> {
    run(
        &backend.command(v6, "restore"),
        &["--noflush", "-w"],
        Some(input),
    )
    .map(|_| ())
}

/// The rules of `chain` in a save of one table, and whether the save declares it.
fn chain_rules<'a>(save: &'a str, chain: &str) -> (bool, Vec<&'a str>) {
    let declared = save
        .lines()
        .any(|l| l.strip_prefix(':').and_then(|r| r.split(' ').next()) == Some(chain));
    let prefix = format!("-A {chain} ");
    let rules = save.lines().filter(|l| l.starts_with(&prefix)).collect();
    (declared, rules)
}

fn jump(c: &Chain) -> String {
    format!("-A {} -j {}", c.from, c.name)
}

/// Makes the node's chains (of one family) hold exactly `chains`, with one jump each inserted
/// at the top of its built-in chain. True if anything changed.
pub fn sync_chains(backend: Backend, v6: bool, chains: &[Chain]) -> Result<bool> {
    let mut input = String::new();
    for table in tables_of(chains) {
        let save = save(backend, v6, table)?;
        let ours: Vec<&Chain> = chains.iter().filter(|c| c.table == table).collect();
        let up_to_date = ours.iter().all(|c| {
            let (declared, rules) = chain_rules(&save, c.name);
            let (_, jumps) = chain_rules(&save, c.from);
            declared && rules == c.rules && jumps.iter().filter(|j| **j == jump(c)).count() == 1
        });
        if up_to_date {
            continue;
        }
        input += &format!("*{table}\n");
        for c in &ours {
            input += &format!(":{} - [0:0]\n-F {}\n", c.name, c.name);
        }
        for c in &ours {
            let (_, jumps) = chain_rules(&save, c.from);
            let present = jumps.iter().filter(|j| **j == jump(c)).count();
            // Duplicates (from a foreign tool or a crash) go; exactly one stays, at the top.
            for _ in 1..present.max(1) {
                input += &format!("-D {} -j {}\n", c.from, c.name);
            }
            if present == 0 {
                input += &format!("-I {} 1 -j {}\n", c.from, c.name);
            }
            for r in &c.rules {
                input += r;
                input.push('\n');
            }
        }
        input += "COMMIT\n";
    }
    if input.is_empty() {
        return Ok(false);
    }
    restore(backend, v6, &input)?;
    Ok(true)
}

fn tables_of(chains: &[Chain]) -> Vec<&'static str> {
    let mut t: Vec<&'static str> = chains.iter().map(|c| c.table).collect();
    t.dedup();
    t
}

/// Removes our chains (of one family) and every jump into them; chains already gone are
/// skipped.
pub fn remove_chains(
    backend: Backend,
    v6: bool,
    chains: &[(&'static str, &'static str, &'static str)],
) -> Result<bool> {
    let mut input = String::new();
    let mut tables: Vec<&str> = chains.iter().map(|c| c.0).collect();
    tables.dedup();
    for table in tables {
        let save = save(backend, v6, table)?;
        let mut body = String::new();
        let mut tail = String::new();
        for &(_, name, from) in chains.iter().filter(|c| c.0 == table) {
            let (declared, _) = chain_rules(&save, name);
            let (_, jumps) = chain_rules(&save, from);
            let target = format!("-A {from} -j {name}");
            for _ in jumps.iter().filter(|j| **j == target) {
                body += &format!("-D {from} -j {name}\n");
            }
            if declared {
                tail += &format!("-F {name}\n-X {name}\n");
            }
        }
        if !body.is_empty() || !tail.is_empty() {
            input += &format!("*{table}\n{body}{tail}COMMIT\n");
        }
    }
    if input.is_empty() {
        return Ok(false);
    }
    restore(backend, v6, &input)?;
    Ok(true)
}

/// Makes the rules `is_ours` selects in a built-in chain equal `want`, in order, appended after
/// the chain's other rules. Used in ztunnel's netns, where the article's rules sit directly in
/// mangle PREROUTING. True if anything changed.
pub fn sync_builtin(
    backend: Backend,
    v6: bool,
    table: &str,
    chain: &str,
    want: &[String],
    is_ours: impl Fn(&str) -> bool,
) -> Result<bool> {
    let save = save(backend, v6, table)?;
    let (_, rules) = chain_rules(&save, chain);
    let present: Vec<&str> = rules.into_iter().filter(|r| is_ours(r)).collect();
    if present.iter().copied().eq(want.iter().map(String::as_str)) {
        return Ok(false);
    }
    let mut input = format!("*{table}\n");
    for r in &present {
        input += &format!("-D{}\n", &r[2..]);
    }
    for r in want {
        input += r;
        input.push('\n');
    }
    input += "COMMIT\n";
    restore(backend, v6, &input)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_follows_the_kubelet_canary_then_the_rule_count() {
        let canary = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let busy = "*filter\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n";
        assert_eq!(choose_backend(canary, busy).0, Backend::Nft);
        assert_eq!(choose_backend(busy, canary).0, Backend::Legacy);
        assert_eq!(choose_backend("", busy).0, Backend::Legacy);
        assert_eq!(choose_backend(busy, "").0, Backend::Nft);
        assert_eq!(choose_backend("", "").0, Backend::Nft, "a tie goes to nft");
    }

    #[test]
    fn chain_rules_are_found_by_exact_chain_name() {
        let save = ":PREROUTING ACCEPT [0:0]\n:ztunnel-PREROUTING - [0:0]\n\
                    -A PREROUTING -j ztunnel-PREROUTING\n-A ztunnel-PREROUTING -j RETURN\n";
        assert_eq!(
            chain_rules(save, "ztunnel-PREROUTING"),
            (true, vec!["-A ztunnel-PREROUTING -j RETURN"])
        );
        assert_eq!(
            chain_rules(save, "PREROUTING").1,
            vec!["-A PREROUTING -j ztunnel-PREROUTING"]
        );
        assert!(!chain_rules(save, "ztunnel").0);
    }
}
