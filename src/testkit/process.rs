//! Processes and ports of a test.

/// A child process killed when the test ends, even by a panic.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Kills it now (SIGKILL) and reaps it; dropping later does nothing more.
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `host:port` where nothing listens, for a receiver that refuses connections. On 127.0.0.2,
/// where the suite binds nothing: a port number that was free on 127.0.0.1 may be taken by a
/// test running beside this one, whose server would then answer in the closed port's place.
pub fn refusing_address() -> String {
    format!("127.0.0.2:{}", free_port())
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}
