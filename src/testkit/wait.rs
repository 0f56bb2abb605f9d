//! Waiting for a condition with a deadline, instead of a hand-written loop in every test: one
//! place decides how often to look and what a timeout says.

use std::future::Future;
use std::time::Duration;

/// How often the plain waits look.
const EVERY: Duration = Duration::from_millis(20);

/// Polls `cond` every 20 ms until it holds, or panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, limit, || {
        if cond() {
            Ok(())
        } else {
            Err(String::new())
        }
    })
    .await
}

/// Polls `probe` every 20 ms until it gives a value, or panics after `limit` with `what` and
/// the probe's last word on why not.
pub async fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    poll(what, limit, EVERY, || std::future::ready(probe())).await
}

/// As `wait_for`, looking every `every` with an asynchronous probe: for probes that make a
/// request, or must catch a state that lasts only a few milliseconds.
pub async fn poll<T, F>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> F,
) -> T
where
    F: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let why = match probe().await {
            Ok(v) => return v,
            Err(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            if why.is_empty() {
                panic!("waited {limit:?} for {what}");
            }
            panic!("waited {limit:?} for {what}: {why}");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_returns_the_value_once_the_probe_gives_one() {
        let mut tries = 0;
        let got = wait_for("three tries", Duration::from_secs(5), || {
            tries += 1;
            if tries == 3 {
                Ok(tries * 10)
            } else {
                Err(format!("try {tries}"))
            }
        })
        .await;
        assert_eq!(got, 30);
    }

    #[tokio::test]
    #[should_panic(expected = "waited 50ms for the impossible: still 7")]
    async fn a_wait_that_times_out_says_what_it_waited_for_and_the_last_state() {
        wait_for::<()>("the impossible", Duration::from_millis(50), || {
            Err("still 7".into())
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "waited 50ms for never")]
    async fn wait_until_panics_with_its_message() {
        wait_until("never", Duration::from_millis(50), || false).await;
    }
}
