//! One daemon per SQLite data directory. A second one on the same store would follow the chain
//! beside the first and send every webhook a second time. The lock is the kernel's, so it goes
//! with its holder however that ends (SIGKILL included); the file names the holder's pid for
//! the message. A daemon that finds the lock taken waits a while first, so a restart whose
//! old process is still finishing its requests goes through.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

pub const LOCK_FILE: &str = "chainwatch.lock";

/// Held for as long as the daemon runs.
pub struct DataDirLock {
    _file: Option<File>,
}

/// Takes `dir`'s lock, waiting up to `wait` for another daemon to let it go.
pub fn lock_data_dir(dir: &Path, wait: Duration) -> anyhow::Result<DataDirLock> {
    // Made as the store makes it (owner only), as the lock comes first.
    crate::store::create_private_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {
                let holder = holder(&mut file);
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "data_dir {} is in use by another chainwatch ({holder}): stop it first, or give this one a data_dir of its own",
                        dir.display()
                    );
                }
                if !told {
                    tracing::warn!(data_dir = %dir.display(), holder, wait_s = wait.as_secs(), "data_dir is in use by another chainwatch; waiting for it to stop");
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(TryLockError::Error(e)) => {
                // A filesystem without locks (some network mounts): run, but say what is lost.
                tracing::warn!(path = %path.display(), error = %e, "cannot lock the data_dir; nothing stops a second chainwatch from using it");
                return Ok(DataDirLock { _file: None });
            }
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(DataDirLock { _file: Some(file) })
}

/// The pid the lock file names. Anyone who can write the data_dir can fill the file: only its
/// first bytes are read.
fn holder(file: &mut File) -> String {
    let mut pid = String::new();
    let read = file
        .rewind()
        .and_then(|_| file.take(24).read_to_string(&mut pid));
    match (read, pid.trim().parse::<u32>()) {
        (Ok(_), Ok(pid)) => format!("pid {pid}"),
        _ => "pid unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_naming_the_holder_and_taken_once_free() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let first = lock_data_dir(&dir, Duration::ZERO).expect("the first takes it");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "a new data_dir is its owner's only");
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        let err = lock_data_dir(&dir, Duration::from_millis(300))
            .err()
            .expect("a second is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("in use by another chainwatch")
                && msg.contains(&format!("pid {}", std::process::id())),
            "says who holds it: {msg}"
        );
        drop(first);
        lock_data_dir(&dir, Duration::ZERO).expect("free again once the first is gone");
    }

    #[test]
    fn a_lock_file_filled_with_junk_names_no_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let mut junk = b"4242".to_vec();
        junk.extend(std::iter::repeat_n(b'x', 1 << 20));
        std::fs::write(&path, &junk).unwrap();
        let mut file = File::options().read(true).open(&path).unwrap();
        assert_eq!(
            holder(&mut file),
            "pid unknown",
            "a megabyte after the digits"
        );
        std::fs::write(&path, "4242\n").unwrap();
        let mut file = File::options().read(true).open(&path).unwrap();
        assert_eq!(holder(&mut file), "pid 4242");
    }
}
