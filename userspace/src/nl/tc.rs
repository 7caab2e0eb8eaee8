//! tc clsact filters, the eBPF dataplane's attachment on kernels without TCX: what is attached
//! where, and its removal. Attaching is aya's (it holds the program's fd).
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};

use super::{Netlink, nl_err};
use crate::error::{Error, Result};

/// One filter on an interface's clsact ingress or egress hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub priority: u16,
    pub handle: u32,
    pub kind: String,
    /// A bpf filter's program name (`TCA_BPF_NAME`).
    pub name: Option<String>,
    pub prog_id: Option<u32>,
}

fn clsact_parent(egress: bool) -> TcHandle {
    TcHandle {
        major: 0xffff,
        minor: if egress {
            TcHandle::MIN_EGRESS
        } else {
            TcHandle::MIN_INGRESS
        },
    }
}

/// Errors that mean "nothing there": no such interface, or no clsact qdisc on it.
fn absent(code: Option<i32>) -> bool {
    matches!(code, Some(libc::ENODEV | libc::EINVAL | libc::ENOENT))
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Netlink {
    /// The filters on `ifindex`'s clsact ingress (or egress) hook; empty when the interface or
    /// its clsact qdisc does not exist.
    pub fn tc_filters(&self, ifindex: u32, egress: bool) -> Result<Vec<TcFilter>> {
        let what = format!("tc filters of ifindex {ifindex}");
        let mut req = self.handle.traffic_filter(ifindex as i32).get();
        req = if egress { req.egress() } else { req.ingress() };
        let msgs = match self
            .rt
            .block_on(async { req.execute().try_collect::<Vec<_>>().await })
        {
            Ok(m) => m,
            Err(e) if absent(errno(&e)) => return Ok(Vec::new()),
            Err(e) => return Err(nl_err(what)(e)),
        };
        // A dump also lists each priority's classifier itself, with handle 0.
        Ok(msgs
            .iter()
            .filter(|m| u32::from(m.header.handle) != 0)
            .map(to_filter)
            .collect())
    }

    /// Deletes the filter at `priority`/`handle`; an absent one is not an error.
    pub fn delete_tc_filter(
        &self,
        ifindex: u32,
        egress: bool,
        priority: u16,
        handle: u32,
    ) -> Result<()> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = clsact_parent(egress);
        // Protocol 0 matches the filter whatever protocol it was created for.
        msg.header.info = u32::from(priority) << 16;
        msg.header.handle = TcHandle::from(handle);
        self.tc_request(
            RouteNetlinkMessage::DelTrafficFilter(msg),
            format!("deleting tc filter {priority}/{handle:#x} of ifindex {ifindex}"),
        )
    }

    /// `tc qdisc del dev <ifindex> clsact`; an absent one is not an error.
    pub fn delete_clsact(&self, ifindex: u32) -> Result<()> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = TcHandle::CLSACT;
        msg.header.handle = TcHandle::from(0xffff_0000);
        msg.attributes.push(TcAttribute::Kind("clsact".into()));
        self.tc_request(
            RouteNetlinkMessage::DelQueueDiscipline(msg),
            format!("deleting the clsact qdisc of ifindex {ifindex}"),
        )
    }

    fn tc_request(&self, msg: RouteNetlinkMessage, what: String) -> Result<()> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut handle = self.handle.clone();
        self.rt.block_on(async {
            let mut response = handle.request(req).map_err(nl_err(what.clone()))?;
            while let Some(m) = response.next().await {
                if let NetlinkPayload::Error(e) = m.payload
                    && let Some(code) = e.code
                {
                    let code = -code.get();
                    if !absent(Some(code)) {
                        return Err(Error::NetlinkIo {
                            what,
                            source: std::io::Error::from_raw_os_error(code),
                        });
                    }
                }
            }
            Ok(())
        })
    }
}

fn to_filter(m: &TcMessage) -> TcFilter {
    let mut f = TcFilter {
        priority: (m.header.info >> 16) as u16,
        handle: u32::from(m.header.handle),
        kind: String::new(),
        name: None,
        prog_id: None,
    };
    for a in &m.attributes {
        match a {
            TcAttribute::Kind(k) => f.kind = k.clone(),
            TcAttribute::Options(opts) => {
                for o in opts {
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => f.name = Some(n.clone()),
                        TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => f.prog_id = Some(*i),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    f
}
