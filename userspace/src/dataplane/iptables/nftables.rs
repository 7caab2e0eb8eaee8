//! The tables iptables-nft creates on first use (`mangle`, `nat`) stay behind, empty, when our
//! chains go. The node had none of them before the fallback ran, so cleanup deletes those it
//! created, once nothing is in them: one `NFT_MSG_DELTABLE` in a netlink batch (there is no
//! iptables command for it, and no `nft` binary is assumed).
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use super::tables::{self, Backend};
use crate::error::{Error, Result};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_DELTABLE: u16 = 2;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFTA_TABLE_NAME: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// The tables of one family that exist now, from a plain `iptables-save` (with `-t`, it would
/// create the table it asks for).
pub fn existing(backend: Backend, v6: bool) -> Result<Vec<String>> {
    Ok(tables::save_all(backend, v6)?
        .lines()
        .filter_map(|l| l.strip_prefix('*'))
        .map(str::to_string)
        .collect())
}

/// Every existing table of both families, tagged `ip:<table>` or `ip6:<table>`.
pub fn tagged_existing(backend: Backend) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        out.extend(existing(backend, v6)?.into_iter().map(|t| tag(v6, &t)));
    }
    Ok(out)
}

pub fn tag(v6: bool, table: &str) -> String {
    format!("{}:{table}", if v6 { "ip6" } else { "ip" })
}

/// Deletes `table` of one family if it holds nothing: no rule, no user chain, every built-in
/// chain's policy ACCEPT. True if it was deleted.
pub fn delete_if_empty(backend: Backend, v6: bool, table: &str) -> Result<bool> {
    if backend != Backend::Nft {
        return Ok(false); // legacy tables are the kernel's, always there
    }
    let save = tables::save_all(backend, v6)?;
    let Some(body) = table_body(&save, table) else {
        return Ok(false);
    };
    let empty = body
        .iter()
        .all(|l| l.starts_with(':') && l.contains(" ACCEPT ["));
    if !empty {
        return Ok(false);
    }
    delete(if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }, table)?;
    Ok(true)
}

fn table_body<'a>(save: &'a str, table: &str) -> Option<Vec<&'a str>> {
    let mut lines = save.lines().skip_while(|l| *l != format!("*{table}"));
    lines.next()?;
    Some(
        lines
            .take_while(|l| *l != "COMMIT")
            .filter(|l| !l.starts_with('#'))
            .collect(),
    )
}

fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend((len as u32).to_ne_bytes());
    m.extend(kind.to_ne_bytes());
    m.extend(flags.to_ne_bytes());
    m.extend(seq.to_ne_bytes());
    m.extend(0u32.to_ne_bytes());
    m.extend([family, 0]);
    m.extend(res_id.to_be_bytes());
    m.extend(attrs);
    m
}

fn delete(family: u8, table: &str) -> Result<()> {
    let fail = |source: std::io::Error| Error::NetlinkIo {
        what: format!("deleting nftables table {table}"),
        source,
    };
    let mut name = table.as_bytes().to_vec();
    name.push(0);
    let attr_len = 4 + name.len();
    let mut attrs = Vec::new();
    attrs.extend((attr_len as u16).to_ne_bytes());
    attrs.extend(NFTA_TABLE_NAME.to_ne_bytes());
    attrs.extend(&name);
    attrs.resize(attrs.len().next_multiple_of(4), 0);
    let request = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let mut batch = message(
        NFNL_MSG_BATCH_BEGIN,
        libc::NLM_F_REQUEST as u16,
        1,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    batch.extend(message(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE,
        request,
        2,
        family,
        0,
        &attrs,
    ));
    batch.extend(message(
        NFNL_MSG_BATCH_END,
        libc::NLM_F_REQUEST as u16,
        3,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    // SAFETY: a plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sending our buffer on our socket (the kernel is the default destination).
    if unsafe { libc::send(sock.as_raw_fd(), batch.as_ptr().cast(), batch.len(), 0) } < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    let mut buf = [0u8; 4096];
    // SAFETY: receiving into our buffer, at most its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // The acknowledgement: an NLMSG_ERROR whose code is 0, or the errno negated.
    let got = &buf[..n as usize];
    if got.len() >= 20 && u16::from_ne_bytes([got[4], got[5]]) == libc::NLMSG_ERROR as u16 {
        let code = i32::from_ne_bytes([got[16], got[17], got[18], got[19]]);
        if code != 0 {
            return Err(fail(std::io::Error::from_raw_os_error(-code)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tables_body_is_read_from_a_save() {
        let save = "# x\n*mangle\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [1:2]\nCOMMIT\n*nat\n\
                    :PREROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE\nCOMMIT\n";
        assert_eq!(
            table_body(save, "mangle"),
            Some(vec![":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [1:2]"])
        );
        assert_eq!(table_body(save, "nat").map(|b| b.len()), Some(2));
        assert_eq!(table_body(save, "filter"), None);
    }
}
