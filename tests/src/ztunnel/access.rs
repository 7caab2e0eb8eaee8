//! ztunnel's access log: one entry per connection (`connection complete`), with the workloads
//! and identities it saw and what it decided.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

/// One access log entry (`connection complete`): ztunnel's record of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub fields: BTreeMap<String, String>,
}

impl Access {
    pub(super) fn parse(line: &str) -> Option<Access> {
        let at = line.find("connection complete")?;
        let mut fields = BTreeMap::new();
        let mut rest = &line[at + "connection complete".len()..];
        loop {
            rest = rest.trim_start();
            let Some(eq) = rest.find('=') else { break };
            let key = rest[..eq].trim().to_string();
            rest = &rest[eq + 1..];
            let value;
            if let Some(quoted) = rest.strip_prefix('"') {
                let end = quoted.find('"').unwrap_or(quoted.len());
                value = quoted[..end].to_string();
                rest = quoted.get(end + 1..).unwrap_or("");
            } else {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                value = rest[..end].to_string();
                rest = &rest[end..];
            }
            fields.insert(key, value);
        }
        Some(Access { fields })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    pub fn direction(&self) -> &str {
        self.get("direction").unwrap_or_default()
    }
    pub fn src_workload(&self) -> &str {
        self.get("src.workload").unwrap_or_default()
    }
    pub fn dst_workload(&self) -> &str {
        self.get("dst.workload").unwrap_or_default()
    }
    pub fn src_identity(&self) -> &str {
        self.get("src.identity").unwrap_or_default()
    }
    pub fn error(&self) -> Option<&str> {
        self.get("error")
    }
    /// The source address ztunnel saw.
    pub fn src_ip(&self) -> Option<IpAddr> {
        self.get("src.addr")?
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
    }
    /// The destination: for HBONE, the address inside the tunnel (`dst.hbone_addr`).
    pub fn dst(&self) -> Option<SocketAddr> {
        self.get("dst.hbone_addr")
            .or(self.get("dst.addr"))?
            .parse()
            .ok()
    }
    /// Denied by authorization policy.
    pub fn denied(&self) -> bool {
        self.error().is_some_and(|e| e.contains("policy"))
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({}) → {} {:?}{}",
            self.direction(),
            self.src_workload(),
            self.get("src.addr").unwrap_or("?"),
            self.dst_workload(),
            self.dst(),
            self.error()
                .map(|e| format!(" error={e}"))
                .unwrap_or_default()
        )
    }
}
