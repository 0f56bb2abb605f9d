//! The ZMQ subscriber: one thread owns the sockets and forwards decoded messages to tokio.
//! Anyone who can reach the port can publish, so everything is bounded: message size, the
//! queue in each socket, and the bytes waiting for the follower. What is dropped shows as a
//! counter gap, which makes the follower resync over RPC.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// The largest message read on a socket carrying bodies: a block or transaction is at most
/// 4,000,000 bytes serialised. A publisher that sends more is disconnected by libzmq.
pub const MAX_MESSAGE_BYTES: i64 = 4 * 1024 * 1024;
/// On a socket carrying only notifications (`sequence`: 32 + 1 + 8 bytes; hashes: 32).
const MAX_NOTICE_BYTES: i64 = 64;
/// Messages a socket queues before libzmq drops new ones: few where each can be 4 MiB.
const HWM_BLOCKS: i32 = 16;
const HWM_TXS: i32 = 256;
const HWM_NOTICES: i32 = 10_000;
/// Bytes of decoded bodies waiting for the follower before new ones are dropped.
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
const MAX_QUEUED_MESSAGES: usize = 10_000;

pub struct Subscriber {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The follower's end: messages in arrival order, their bytes released as they are taken.
pub struct ZmqReceiver {
    rx: mpsc::Receiver<(ZmqMessage, usize)>,
    queued: Arc<AtomicUsize>,
}

impl ZmqReceiver {
    pub async fn recv(&mut self) -> Option<ZmqMessage> {
        let (m, n) = self.rx.recv().await?;
        self.queued.fetch_sub(n, Ordering::SeqCst);
        Some(m)
    }

    pub fn try_recv(&mut self) -> Option<ZmqMessage> {
        let (m, n) = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(n, Ordering::SeqCst);
        Some(m)
    }
}

impl Subscriber {
    /// Connects and starts forwarding. Malformed messages are logged and skipped.
    pub fn start(subs: Vec<Subscription>) -> Result<(Subscriber, ZmqReceiver), zmq::Error> {
        let (tx, rx) = mpsc::channel(MAX_QUEUED_MESSAGES);
        let queued = Arc::new(AtomicUsize::new(0));
        let ctx = zmq::Context::new();
        let mut sockets = Vec::new();
        // One socket per distinct address, so topics that share a publisher share a socket.
        let mut addresses: Vec<&str> = subs.iter().map(|s| s.address.as_str()).collect();
        addresses.sort();
        addresses.dedup();
        for addr in addresses {
            let s = ctx.socket(zmq::SUB)?;
            let carries = |topic: &str| subs.iter().any(|s| s.address == addr && s.topic == topic);
            let (hwm, max) = if carries("rawblock") {
                (HWM_BLOCKS, MAX_MESSAGE_BYTES)
            } else if carries("rawtx") {
                (HWM_TXS, MAX_MESSAGE_BYTES)
            } else {
                (HWM_NOTICES, MAX_NOTICE_BYTES)
            };
            s.set_rcvhwm(hwm)?;
            s.set_maxmsgsize(max)?;
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
        let bridge = Bridge {
            tx,
            queued: queued.clone(),
            dropped: 0,
        };
        let thread = std::thread::Builder::new()
            .name("zmq-subscriber".into())
            .spawn(move || receive_loop(ctx, sockets, bridge, flag))
            .expect("spawn zmq thread");
        let subscriber = Subscriber {
            stop,
            thread: Some(thread),
        };
        Ok((subscriber, ZmqReceiver { rx, queued }))
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

/// The thread's end of the channel, with the byte budget.
struct Bridge {
    tx: mpsc::Sender<(ZmqMessage, usize)>,
    queued: Arc<AtomicUsize>,
    /// Messages dropped in the current overflow, told once when it starts and once at its end.
    dropped: u64,
}

impl Bridge {
    /// Forwards a message unless the follower is that far behind (then it is dropped, which the
    /// follower sees as a counter gap); false once the follower has gone.
    fn forward(&mut self, msg: ZmqMessage, bytes: usize) -> bool {
        let full = self.queued.load(Ordering::SeqCst) + bytes > MAX_QUEUED_BYTES
            || self.tx.capacity() == 0;
        if full {
            if self.dropped == 0 {
                tracing::warn!(topic = %msg.topic, counter = msg.counter, bytes, "ZMQ queue full; dropping messages until the follower catches up (it resyncs over RPC)");
            }
            self.dropped += 1;
            return true;
        }
        if self.dropped > 0 {
            tracing::info!(dropped = self.dropped, "ZMQ queue has room again");
            self.dropped = 0;
        }
        self.queued.fetch_add(bytes, Ordering::SeqCst);
        match self.tx.try_send((msg, bytes)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued.fetch_sub(bytes, Ordering::SeqCst);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// How long one socket is drained before the others get their turn.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_millis(20);

fn receive_loop(
    _ctx: zmq::Context,
    sockets: Vec<zmq::Socket>,
    mut bridge: Bridge,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut items: Vec<zmq::PollItem> = sockets
            .iter()
            .map(|s| s.as_poll_item(zmq::POLLIN))
            .collect();
        if let Err(e) = zmq::poll(&mut items, 200) {
            tracing::warn!(error = %e, "zmq poll failed");
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let ready: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
        for (socket, ready) in sockets.iter().zip(ready) {
            if !ready {
                continue;
            }
            // A bounded drain per socket and round, in messages and in time, so a flood on
            // one (of large forged blocks, each proven before it is refused) starves no other.
            let started = std::time::Instant::now();
            for _ in 0..1000 {
                if started.elapsed() > DRAIN_TIME {
                    break;
                }
                let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) else {
                    break;
                };
                let bytes = frames.iter().map(Vec::len).sum();
                match zmq_wire::decode(&frames) {
                    Ok(msg) => {
                        if !bridge.forward(msg, bytes) {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping malformed ZMQ message"),
                }
            }
        }
    }
}
