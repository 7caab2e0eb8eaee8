//! The fallback's ipsets, changed incrementally with one `ipset restore` per set and apply: a
//! pod added or removed is one `add` or `del` per set, never a rebuild.
use std::collections::BTreeSet;

use super::tables::run;
use crate::error::Result;

/// The set's members as `ipset save` prints them, or None if the set does not exist.
pub fn members(set: &str) -> Result<Option<BTreeSet<String>>> {
    let list = run("ipset", &["list", "-n"], None)?;
    if !list.lines().any(|l| l.trim() == set) {
        return Ok(None);
    }
    let save = run("ipset", &["save", set], None)?;
    Ok(Some(parse_members(&save, set)))
}

fn parse_members(save: &str, set: &str) -> BTreeSet<String> {
    let prefix = format!("add {set} ");
    save.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|m| m.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The `ipset restore` input that turns `have` (None: no set) into `want`; `kind` is the set
/// type with its options, for creating it (`hash:ip family inet`).
pub fn restore_input(
    set: &str,
    kind: &str,
    have: Option<&BTreeSet<String>>,
    want: &BTreeSet<String>,
) -> String {
    let empty = BTreeSet::new();
    let mut s = String::new();
    if have.is_none() {
        s += &format!("create {set} {kind} -exist\n");
    }
    let have = have.unwrap_or(&empty);
    for ip in want.difference(have) {
        s += &format!("add {set} {ip} -exist\n");
    }
    for ip in have.difference(want) {
        s += &format!("del {set} {ip} -exist\n");
    }
    s
}

/// Makes the set hold exactly `want`; returns how many members changed.
pub fn sync(set: &str, kind: &str, want: &BTreeSet<String>) -> Result<usize> {
    let have = members(set)?;
    let input = restore_input(set, kind, have.as_ref(), want);
    if input.is_empty() {
        return Ok(0);
    }
    run("ipset", &["restore"], Some(&input))?;
    Ok(input.lines().filter(|l| !l.starts_with("create")).count())
}

/// Adds `members` to an existing set, in one `ipset restore`.
pub fn add(set: &str, members: &BTreeSet<String>) -> Result<()> {
    let input: String = members
        .iter()
        .map(|m| format!("add {set} {m} -exist\n"))
        .collect();
    if !input.is_empty() {
        run("ipset", &["restore"], Some(&input))?;
    }
    Ok(())
}

/// Destroys the set (after the rules that use it are gone); true if it existed.
pub fn destroy(set: &str) -> Result<bool> {
    if members(set)?.is_none() {
        return Ok(false);
    }
    run("ipset", &["destroy", set], None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[[u8; 4]]) -> BTreeSet<String> {
        v.iter()
            .map(|o| std::net::Ipv4Addr::from(*o).to_string())
            .collect()
    }

    #[test]
    fn one_pod_changed_is_one_line() {
        let have = ips(&[[10, 244, 2, 3], [10, 244, 2, 7]]);
        let want = ips(&[[10, 244, 2, 3], [10, 244, 2, 8]]);
        assert_eq!(
            restore_input("s", "hash:ip", Some(&have), &want),
            "add s 10.244.2.8 -exist\ndel s 10.244.2.7 -exist\n"
        );
        assert_eq!(restore_input("s", "hash:ip", Some(&want), &want), "");
        assert!(restore_input("s", "hash:ip", None, &want).starts_with("create s hash:ip"));
    }

    #[test]
    fn members_are_parsed_from_ipset_save() {
        let save = "create s hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12\n\
                    add s 10.244.2.5\nadd s 10.244.2.2\n";
        assert_eq!(
            parse_members(save, "s"),
            ips(&[[10, 244, 2, 2], [10, 244, 2, 5]])
        );
    }
}
