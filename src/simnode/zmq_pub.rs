//! One ZMQ PUB socket per topic, on its own thread, as bitcoind configured with one port per topic.

use std::sync::mpsc;

use super::chain::{Published, TOPICS};

pub struct Publisher {
    tx: mpsc::Sender<Vec<Published>>,
}

impl Publisher {
    /// Binds every topic to an ephemeral loopback port; returns the notifications list.
    pub fn bind() -> Result<(Publisher, Vec<(String, String)>), zmq::Error> {
        let ctx = zmq::Context::new();
        let mut sockets = Vec::new();
        let mut list = Vec::new();
        for topic in TOPICS {
            let s = ctx.socket(zmq::PUB)?;
            s.set_sndhwm(0)?;
            s.bind("tcp://127.0.0.1:*")?;
            let addr = s.get_last_endpoint()?.map_err(|_| zmq::Error::EINVAL)?;
            list.push((format!("pub{topic}"), addr));
            sockets.push((topic, s));
        }
        let (tx, rx) = mpsc::channel::<Vec<Published>>();
        std::thread::Builder::new()
            .name("simnode-zmq".into())
            .spawn(move || {
                let _ctx = ctx;
                while let Ok(batch) = rx.recv() {
                    for m in batch {
                        if let Some((_, s)) = sockets.iter().find(|(t, _)| *t == m.topic) {
                            let frames = crate::node::zmq_wire::encode(m.topic, m.body, m.counter);
                            let _ = s.send_multipart(frames, 0);
                        }
                    }
                }
            })
            .expect("spawn simnode zmq thread");
        Ok((Publisher { tx }, list))
    }

    pub fn send(&self, batch: Vec<Published>) {
        if !batch.is_empty() {
            let _ = self.tx.send(batch);
        }
    }
}
