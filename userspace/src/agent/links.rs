//! The link watch: veths that appear on the node while the agent runs are reported to the
//! reconcile loop the moment the kernel announces them (RTM_NEWLINK), so their TCP is held
//! before the pod behind them can be known from the API (the pod start window).
use std::{collections::HashSet, sync::mpsc::Sender};

use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::{
    constants::RTMGRP_LINK,
    packet_core::NetlinkPayload,
    sys::{AsyncSocket as _, SocketAddr},
};

use super::Input;
use crate::{
    error::{Error, Result},
    nl::to_link,
};

/// Starts watching the calling thread's netns (the node's); returns once the subscription is
/// in place, so no veth created after this returns is missed.
pub fn watch(inputs: Sender<Input>) -> Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("link-watch".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(netlink("runtime", e)));
                    return;
                }
            };
            if let Err(e) = rt.block_on(run(inputs, &ready_tx)) {
                // Before the subscription this goes to `watch`'s caller; after, it is logged.
                if let Err(std::sync::mpsc::SendError(Err(e))) = ready_tx.send(Err(e)) {
                    log::error!(
                        "link watch stopped: {}; new veths are no longer held",
                        e.chain()
                    );
                }
            }
        })
        .map_err(|e| netlink("thread", e))?;
    ready_rx.recv().unwrap_or_else(|_| {
        Err(netlink(
            "thread",
            std::io::Error::other("exited before subscribing"),
        ))
    })
}

async fn run(inputs: Sender<Input>, ready: &Sender<Result<()>>) -> Result<()> {
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().map_err(|e| netlink("socket", e))?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))
        .map_err(|e| netlink("subscribing to link events", e))?;
    tokio::spawn(conn);
    // What exists now is not new; a link announced while this dump runs is in it, too.
    let mut known: HashSet<u32> = handle
        .link()
        .get()
        .execute()
        .map_ok(|m| m.header.index)
        .try_collect()
        .await
        .map_err(crate::nl::nl_err("link dump"))?;
    let _ = ready.send(Ok(()));
    while let Some((msg, _)) = messages.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                let link = to_link(&m);
                if link.is_veth
                    && known.insert(link.index)
                    && inputs.send(Input::NewLinks(vec![link])).is_err()
                {
                    return Ok(()); // the agent is stopping
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                known.remove(&m.header.index);
            }
            _ => {}
        }
    }
    Ok(())
}

fn netlink(what: &str, source: std::io::Error) -> Error {
    Error::NetlinkIo {
        what: what.into(),
        source,
    }
}
