//! A YAML node description, for labs and tests: the ztunnel pod (IPs, netns path) and the ambient
//! pods (IPs). Validated whole: a bad file is rejected with the entry that is wrong named, and
//! the agent keeps the last good state.
use std::{
    collections::{BTreeMap, HashMap},
    net::{AddrParseError, IpAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    error::{Error, Result},
    state::{NodeState, PodId, PodSpec, ZtunnelSpec},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    node: String,
    #[serde(default)]
    ztunnel: Option<ZtunnelEntry>,
    #[serde(default)]
    pods: Vec<PodEntry>,
    /// This node's pods outside the mesh: not captured; their new veths are released from the
    /// start-window hold.
    #[serde(default)]
    outside: Vec<PodEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZtunnelEntry {
    name: String,
    #[serde(default = "istio_system")]
    namespace: String,
    ips: Vec<String>,
    #[serde(default)]
    netns: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodEntry {
    name: String,
    #[serde(default = "default_ns")]
    namespace: String,
    ips: Vec<String>,
    /// For in-pod ztunnel: the pod's uid, service account and netns path.
    #[serde(default)]
    uid: Option<String>,
    #[serde(default, rename = "serviceAccount")]
    service_account: Option<String>,
    #[serde(default)]
    netns: Option<PathBuf>,
}

/// What is wrong with a node description, naming the entry.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("not a node description")]
    Yaml(#[from] serde_yaml::Error),
    #[error("`node` is empty")]
    EmptyNode,
    #[error("{who}: no `ips`")]
    NoIps { who: String },
    #[error("{who}: `{text}` is not an IP address")]
    BadIp {
        who: String,
        text: String,
        #[source]
        source: AddrParseError,
    },
    #[error("{who}: address {ip} is also claimed by {other}")]
    Claimed {
        who: String,
        ip: IpAddr,
        other: String,
    },
    #[error("pod {0} is listed twice")]
    Twice(PodId),
}

fn istio_system() -> String {
    "istio-system".into()
}
fn default_ns() -> String {
    "default".into()
}

pub fn read(path: &Path) -> Result<NodeState> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::NodeFileRead {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|source| Error::NodeFile {
        path: path.into(),
        source,
    })
}

pub fn parse(text: &str) -> Result<NodeState, Invalid> {
    let file: NodeFile = serde_yaml::from_str(text)?;
    if file.node.trim().is_empty() {
        return Err(Invalid::EmptyNode);
    }
    // Which entry claimed each address first: two owners would let one pass for the other.
    let mut owners: HashMap<IpAddr, String> = HashMap::new();
    let mut claim = |who: &str, ips: &[String]| -> Result<Vec<IpAddr>, Invalid> {
        if ips.is_empty() {
            return Err(Invalid::NoIps { who: who.into() });
        }
        ips.iter()
            .map(|s| {
                let ip: IpAddr = s.parse().map_err(|source| Invalid::BadIp {
                    who: who.into(),
                    text: s.clone(),
                    source,
                })?;
                if let Some(other) = owners.insert(ip, who.to_string()) {
                    return Err(Invalid::Claimed {
                        who: who.into(),
                        ip,
                        other,
                    });
                }
                Ok(ip)
            })
            .collect()
    };
    let ztunnel = match file.ztunnel {
        Some(z) => {
            let pod = PodId {
                namespace: z.namespace,
                name: z.name,
            };
            let ips = claim(&format!("ztunnel {pod}"), &z.ips)?;
            Some(ZtunnelSpec {
                pod,
                ips,
                netns: z.netns,
            })
        }
        None => None,
    };
    let mut pods = BTreeMap::new();
    for p in file.pods {
        let id = PodId {
            namespace: p.namespace,
            name: p.name,
        };
        let ips = claim(&format!("pod {id}"), &p.ips)?;
        let spec = PodSpec {
            ips,
            uid: p.uid.unwrap_or_else(|| id.to_string()),
            service_account: p.service_account.unwrap_or_else(|| "default".into()),
            netns: p.netns,
        };
        if pods.insert(id.clone(), spec).is_some() {
            return Err(Invalid::Twice(id));
        }
    }
    let mut outside = std::collections::BTreeSet::new();
    for p in file.outside {
        let id = PodId {
            namespace: p.namespace,
            name: p.name,
        };
        outside.extend(claim(&format!("pod {id} (outside the mesh)"), &p.ips)?);
    }
    Ok(NodeState {
        node: file.node,
        ztunnel,
        pods,
        outside,
        ..NodeState::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: ambient-worker2
ztunnel: { name: ztunnel-x, ips: [10.244.2.10], netns: /run/netns/zt }
pods:
  - { name: productpage-v1, ips: [10.244.2.3] }
  - { name: reviews-v1, namespace: bookinfo, ips: [10.244.2.7, "fd00:10:244:2::7"] }
"#;

    #[test]
    fn parses_the_article_node() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.node, "ambient-worker2");
        let z = s.ztunnel.unwrap();
        assert_eq!(z.pod.to_string(), "istio-system/ztunnel-x");
        assert_eq!(z.ips, vec!["10.244.2.10".parse::<IpAddr>().unwrap()]);
        let reviews = PodId {
            namespace: "bookinfo".into(),
            name: "reviews-v1".into(),
        };
        assert_eq!(s.pods[&reviews].ips.len(), 2);
        assert!(s.pods.contains_key(&PodId {
            namespace: "default".into(),
            name: "productpage-v1".into()
        }));
    }

    #[test]
    fn rejects_bad_input_naming_the_entry() {
        let cases = [
            (
                "node: n\npods: [{name: a, ips: [10.0.0.300]}]",
                "pod default/a: `10.0.0.300` is not an IP",
            ),
            (
                "node: n\npods: [{name: a, ips: []}]",
                "pod default/a: no `ips`",
            ),
            (
                "node: n\npods: [{name: a, ips: [10.0.0.1]}, {name: b, ips: [10.0.0.1]}]",
                "pod default/b: address 10.0.0.1 is also claimed by pod default/a",
            ),
            (
                "node: n\nztunnel: {name: z, ips: [10.0.0.1], netns: /x}\npods: [{name: a, ips: [10.0.0.1]}]",
                "also claimed by ztunnel istio-system/z",
            ),
            (
                "node: n\npods: [{name: a, ips: [10.0.0.1]}, {name: a, ips: [10.0.0.2]}]",
                "listed twice",
            ),
            (
                "node: n\npods: [{name: a, ips: [10.0.0.1], colour: red}]",
                "unknown field `colour`",
            ),
            ("node: ''", "`node` is empty"),
        ];
        for (text, want) in cases {
            let err = crate::error::Chain(&parse(text).unwrap_err()).to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
        }
    }
}
