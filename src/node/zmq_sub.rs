//! The ZMQ subscriber: one thread owns the sockets and forwards decoded messages to tokio.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::zmq_wire::{self, ZmqMessage};

/// Topic → endpoint to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub topic: String,
    pub address: String,
}

pub struct Subscriber {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects and starts forwarding. Malformed messages are logged and skipped.
    pub fn start(
        subs: Vec<Subscription>,
        tx: mpsc::Sender<ZmqMessage>,
    ) -> Result<Subscriber, zmq::Error> {
        let ctx = zmq::Context::new();
        let mut sockets = Vec::new();
        // One socket per distinct address, so topics that share a publisher share a socket.
        let mut addresses: Vec<&str> = subs.iter().map(|s| s.address.as_str()).collect();
        addresses.sort();
        addresses.dedup();
        for addr in addresses {
            let s = ctx.socket(zmq::SUB)?;
            s.set_rcvhwm(0)?;
            s.set_reconnect_ivl(500)?;
            s.set_reconnect_ivl_max(5000)?;
            s.set_tcp_keepalive(1)?;
            for sub in subs.iter().filter(|s| s.address == addr) {
                s.set_subscribe(sub.topic.as_bytes())?;
            }
            s.connect(addr)?;
            sockets.push(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("zmq-subscriber".into())
            .spawn(move || receive_loop(ctx, sockets, tx, flag))
            .expect("spawn zmq thread");
        Ok(Subscriber {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn receive_loop(
    _ctx: zmq::Context,
    sockets: Vec<zmq::Socket>,
    tx: mpsc::Sender<ZmqMessage>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut items: Vec<zmq::PollItem> = sockets
            .iter()
            .map(|s| s.as_poll_item(zmq::POLLIN))
            .collect();
        if let Err(e) = zmq::poll(&mut items, 200) {
            tracing::warn!(error = %e, "zmq poll failed");
            continue;
        }
        let ready: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
        for (socket, ready) in sockets.iter().zip(ready) {
            if !ready {
                continue;
            }
            while let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) {
                match zmq_wire::decode(&frames) {
                    Ok(msg) => {
                        if tx.blocking_send(msg).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping malformed ZMQ message"),
                }
            }
        }
    }
}
